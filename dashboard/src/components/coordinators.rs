//! The coordinators of the cluster, when there are several: which one this page reads (it sees the
//! cluster through that one), each one's state, the leader, its requests in flight, and a link to
//! the others' dashboards.

use leptos::prelude::*;
use sollol_shared::api::{CoordinatorInfo, CoordinatorState};

use crate::store::Store;

#[component]
pub(super) fn Coordinators(store: Store) -> impl IntoView {
    move || {
        let list = store.coordinators.get()?;
        // A coordinator alone has nothing to show here.
        if list.coordinators.len() < 2 {
            return None;
        }
        Some(view! {
            <section class="panel" id="coordinators">
                <h2>"Coordinators"</h2>
                <ul class="coordinators">
                    {list.coordinators.into_iter().map(|coordinator| view! { <Coordinator coordinator=coordinator/> }).collect_view()}
                </ul>
            </section>
        })
    }
}

#[component]
fn Coordinator(coordinator: CoordinatorInfo) -> impl IntoView {
    let this = coordinator.state == CoordinatorState::This;
    let (class, state) = match coordinator.state {
        CoordinatorState::This => ("up", "this page reads it"),
        CoordinatorState::Alive => ("up", "alive"),
        CoordinatorState::Down => ("down", "down"),
        CoordinatorState::Refused => ("down", "refused"),
    };
    let name = if coordinator.name.is_empty() {
        coordinator.cluster_address.clone()
    } else {
        coordinator.name.clone()
    };
    let state_name = format!("{:?}", coordinator.state).to_lowercase();
    let label = name.clone();
    let link = (!this && !coordinator.gateway_url.is_empty()).then(|| {
        format!(
            "{}/dashboard/",
            coordinator.gateway_url.trim_end_matches('/')
        )
    });
    view! {
        <li class=format!("coordinator {class}") data-name=name data-state=state_name
            aria-current=this.then_some("true")>
            <b>{label}</b>
            <span class="pill">{state}</span>
            {coordinator.leader.then(|| view! { <span class="pill joined" title="runs the group's background decisions (replica copies)">"leader"</span> })}
            <span class="muted">{format!("{} in flight · {}", coordinator.in_flight, coordinator.cluster_address)}</span>
            {link.map(|link| view! { <a href=link>"open its dashboard"</a> })}
            {coordinator.detail.map(|detail| view! { <p class="fact down">{detail}</p> })}
        </li>
    }
}
