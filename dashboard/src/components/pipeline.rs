//! The distributed models panel: each model's pipeline, stage by stage.

use leptos::prelude::*;
use sollol_shared::api::{DistributedModel, PlanPhase};

use crate::format;
use crate::store::Store;

/// Distributed models: each one's pipeline, stage by stage, and what a token costs.
#[component]
pub(super) fn Pipelines(store: Store) -> impl IntoView {
    move || {
        let models = store.distributed.get();
        (!models.is_empty()).then(|| {
            view! {
                <section class="panel" id="pipelines">
                    <h2>"Distributed models"</h2>
                    {models.into_iter().map(|model| view! { <PipelineView model=model/> }).collect_view()}
                </section>
            }
        })
    }
}

#[component]
fn PipelineView(model: DistributedModel) -> impl IntoView {
    let figure = |value: Option<f64>, unit: &str, digits: usize| {
        value.map_or_else(
            || "–".to_owned(),
            |value| format!("{value:.digits$} {unit}"),
        )
    };
    let summary = if model.planned {
        format!(
            "{} stages · {} · {} per hop · {} per token · {} re-plans",
            model.stages.len(),
            figure(model.tokens_per_second, "tokens/s", 1),
            figure(model.hop_ms, "ms", 2),
            model
                .bytes_per_token
                .map_or_else(|| "–".to_owned(), |bytes| format::bytes(bytes as u64)),
            model.replans
        )
    } else if let Some(planning) = &model.planning {
        let seconds = planning.elapsed_ms as f64 / 1e3;
        match planning.phase {
            PlanPhase::Describing => format!("planning: describing the agents ({seconds:.1} s)"),
            PlanPhase::Loading => format!(
                "planning: loading the stages ({seconds:.1} s): {}",
                planning
                    .stages
                    .iter()
                    .map(|stage| format!(
                        "{} {}–{} {}{}",
                        stage.name,
                        stage.layers_start,
                        stage.layers_end.saturating_sub(1),
                        if stage.loaded { "✓" } else { "…" },
                        if stage.fetch_total_bytes > 0 && !stage.loaded {
                            format!(
                                ", fetched {} of {}",
                                format::bytes(stage.fetched_bytes),
                                format::bytes(stage.fetch_total_bytes)
                            )
                        } else {
                            String::new()
                        }
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    } else {
        "not planned yet: the first request plans it".to_owned()
    };
    view! {
        <div class="pipeline" data-model=model.model.clone()>
            <div class="pipeline-head"><strong>{model.model.clone()}</strong> " " <span class="muted">{summary}</span></div>
            <ol class="stages">
                {model.stages.iter().map(|stage| {
                    let mut roles = Vec::new();
                    if stage.embed { roles.push("embeddings"); }
                    if stage.head { roles.push("head, sampling"); }
                    view! {
                        <li class="stage">
                            <a href=format!("#/node/{}", stage.node_id)>{stage.name.clone()}</a>
                            <div class="stage-layers">{format!("layers {}–{}", stage.layers_start, stage.layers_end.saturating_sub(1))}</div>
                            <div class="muted">{roles.join(", ")}</div>
                            <div class="muted">{format!("{} resident", format::bytes(stage.resident_bytes))}</div>
                            <div class="muted">{figure(stage.compute_ms_per_token, "ms/token", 2)}</div>
                        </li>
                    }
                }).collect_view()}
            </ol>
            {model.last_error.clone().map(|error| view! { <p class="state error">"last error: " {error}</p> })}
            {(!model.reasons.is_empty()).then(|| view! {
                <details><summary>"why this plan"</summary>
                    <ul>{model.reasons.iter().map(|reason| view! { <li>{reason.clone()}</li> }).collect_view()}</ul>
                </details>
            })}
        </div>
    }
}
