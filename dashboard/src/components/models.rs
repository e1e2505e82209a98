//! The models page: which node holds which model (loaded, present or absent), from the live node list,
//! so a pull, copy or delete anywhere in the cluster shows up as the nodes report it; copies between
//! nodes show their progress live (`transfer` events).

use leptos::prelude::*;
use sollol_shared::model_matrix::{ModelMatrix, Presence};

use crate::format;
use crate::store::Store;

#[component]
pub(crate) fn ModelsPage(store: Store) -> impl IntoView {
    let matrix = move || {
        store.nodes.get().map(|nodes| {
            ModelMatrix::of(&nodes)
                .with_transfers(&store.transfers.get())
                .with_replicas(&store.replicas.get())
        })
    };
    view! {
        <section id="models-page">
            <h2>"Models"</h2>
            <p class="state">
                "Each row is a model, each column an up node whose Ollama answers. Pull, copy and delete through the gateway ("
                <code>"sollol pull"</code> ", " <code>"sollol rm"</code> ", or any Ollama client) to change them."
            </p>
            {move || match matrix() {
                None => view! { <p class="state">"Loading…"</p> }.into_any(),
                Some(matrix) if matrix.nodes.is_empty() => {
                    view! { <p class="state">"No node with a reachable Ollama is up."</p> }.into_any()
                }
                Some(matrix) if matrix.models.is_empty() => {
                    view! { <p class="state">"No models on any node yet."</p> }.into_any()
                }
                Some(matrix) => view! { <Matrix matrix=matrix/> }.into_any(),
            }}
        </section>
    }
}

#[component]
fn Matrix(matrix: ModelMatrix) -> impl IntoView {
    let nodes = matrix.nodes.clone();
    // A column for the copies the coordinator keeps, when it keeps any.
    let kept = matrix.models.iter().any(|row| row.wanted.is_some());
    view! {
        <div class="scroll">
            <table id="model-matrix">
                <thead>
                    <tr>
                        <th>"Model"</th>
                        <th>"Size"</th>
                        {kept.then(|| view! { <th title="copies the coordinator keeps (models.replicas)">"Keep"</th> })}
                        {nodes.into_iter().map(|node| view! { <th>{node}</th> }).collect_view()}
                    </tr>
                </thead>
                <tbody>
                    {matrix.models.into_iter().map(|row| {
                        let name = row.model.clone();
                        view! {
                        <tr data-model=name>
                            <td>{row.model}</td>
                            <td>{format::bytes(row.size_bytes)}</td>
                            {kept.then(|| view! {
                                <td class="kept">{row.wanted.map_or_else(|| "–".to_owned(), |count| count.to_string())}</td>
                            })}
                            {row.on.into_iter().map(|presence| {
                                let (class, text) = match presence {
                                    Presence::Loaded => ("loaded", "loaded".to_owned()),
                                    Presence::Present => ("present", "yes".to_owned()),
                                    Presence::Copying(percent) => ("copying", format!("copying {percent}%")),
                                    Presence::Absent => ("absent", "–".to_owned()),
                                };
                                view! { <td class=class>{text}</td> }
                            }).collect_view()}
                        </tr>
                        }
                    }).collect_view()}
                </tbody>
            </table>
        </div>
    }
}
