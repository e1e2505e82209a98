//! Sequences on a stage: opening one (its KV cache, and the last stage's sampler), running the waiting
//! steps of several sequences through the part's layers as one batch, handing the hidden states on to
//! the next stage, and sampling on the last stage.

use std::sync::PoisonError;
use std::time::Instant;

use sollol_shared::layers::{
    Forward, MAX_LAYER_FRAME_BYTES, Output, Sampling, StageInput, StageReply, StageRequest,
    StageTrace,
};
use sollol_shared::protocol::RefusalCode;
use tokio::sync::mpsc;

use super::{LoadedPart, Sequence, Stage, refusal};
use crate::cluster::wire;
use sollol_engine::model::{Model, Segment};
use sollol_engine::sampling::{Sampler, SamplingOptions};

impl Stage {
    /// Opens `sequence`, its results going to `replies`: a KV cache for the loaded part, and (last
    /// stage) a sampler with `sampling` and the tokens so far, for the repeat penalty.
    pub(super) async fn open(
        &self,
        sequence: u64,
        sampling: Option<Sampling>,
        history: Vec<u32>,
        replies: &mpsc::Sender<StageReply>,
    ) -> StageReply {
        let part = self.part.lock().await.clone();
        let Some(part) = part else {
            return refusal(
                RefusalCode::BadRequest,
                "no model part is loaded on this stage",
            );
        };
        let sampler = sampling.map(|sampling| {
            Sampler::new(SamplingOptions {
                temperature: sampling.temperature,
                top_k: sampling.top_k as usize,
                top_p: sampling.top_p,
                min_p: sampling.min_p,
                repeat_penalty: sampling.repeat_penalty,
                repeat_last_n: sampling.repeat_last_n as usize,
                seed: Some(sampling.seed),
            })
        });
        self.sequences
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                sequence,
                Sequence {
                    cache: part.model.new_cache(),
                    reply: replies.clone(),
                    sampler,
                    history,
                },
            );
        StageReply::Opened { sequence }
    }

    /// Runs `steps` (each a different sequence) as one batch; hands the hidden states on to the next
    /// stage in one frame, or (last stage) answers each sequence's opener.
    pub(super) async fn forward(&self, steps: Vec<Forward>, replies: &mpsc::Sender<StageReply>) {
        let part = self.part.lock().await.clone();
        let mut batch = Vec::with_capacity(steps.len());
        let mut answers = Vec::new();
        {
            let mut sequences = self
                .sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for step in steps {
                match sequences.remove(&step.sequence) {
                    Some(sequence) if part.is_some() => batch.push((step, sequence)),
                    _ => answers.push((
                        replies.clone(),
                        StageReply::Failed {
                            sequence: step.sequence,
                            message: format!(
                                "node {} has no open sequence {}",
                                self.settings.node_name, step.sequence
                            ),
                            downstream: false,
                        },
                    )),
                }
            }
        }
        let mut onward = Vec::new();
        if let Some(part) = part.filter(|_| !batch.is_empty()) {
            let started = Instant::now();
            let run = move || {
                let results = compute(&part, &mut batch);
                (batch, results)
            };
            // On this worker when the runtime allows (one thread hand-off less per forward).
            let computed = if tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread
            {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    tokio::task::block_in_place(run)
                }))
                .map_err(|_| ())
            } else {
                tokio::task::spawn_blocking(run).await.map_err(|_| ())
            };
            let Ok((batch, results)) = computed else {
                tracing::error!("a stage computation panicked");
                return;
            };
            // Each step is charged its share of the batch.
            let size = batch.len();
            let share = started.elapsed().as_micros() / size as u128;
            let mut sequences = self
                .sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for ((mut step, sequence), result) in batch.into_iter().zip(results) {
                let reply = sequence.reply.clone();
                sequences.insert(step.sequence, sequence);
                step.trace.push(StageTrace {
                    compute_us: u32::try_from(share).unwrap_or(u32::MAX),
                    sent_bytes: 0,
                    batch: u32::try_from(size).unwrap_or(u32::MAX),
                });
                let answer = match result {
                    Err(message) => StageReply::Failed {
                        sequence: step.sequence,
                        message: format!("node {}: {message}", self.settings.node_name),
                        downstream: false,
                    },
                    Ok(Computed::Nothing) => continue,
                    Ok(Computed::Sampled(token)) => StageReply::Sampled {
                        sequence: step.sequence,
                        token,
                        trace: step.trace,
                    },
                    Ok(Computed::Logits(values)) => StageReply::Logits {
                        sequence: step.sequence,
                        values,
                        trace: step.trace,
                    },
                    Ok(Computed::Hidden { tokens, values }) => {
                        // The hidden states dominate the frame; the rest is a few dozen bytes.
                        if let Some(mine) = step.trace.last_mut() {
                            mine.sent_bytes =
                                u32::try_from(values.len() * 4 + 32).unwrap_or(u32::MAX);
                        }
                        step.input = StageInput::Hidden { tokens, values };
                        onward.push((reply, step));
                        continue;
                    }
                };
                answers.push((reply, answer));
            }
        }
        if !onward.is_empty() {
            let (owners, steps): (Vec<_>, Vec<_>) = onward.into_iter().unzip();
            let sequences: Vec<u64> = steps.iter().map(|step| step.sequence).collect();
            let request = StageRequest::Forward { steps };
            let mut link = self.next.lock().await;
            let sent = match link.as_mut() {
                Some((_, writer)) => {
                    wire::write_message_within(writer, &request, MAX_LAYER_FRAME_BYTES)
                        .await
                        .map_err(|error| error.to_string())
                }
                None => Err("no next stage is connected".to_owned()),
            };
            if let Err(message) = sent {
                *link = None;
                for (owner, sequence) in owners.into_iter().zip(sequences) {
                    answers.push((
                        owner,
                        StageReply::Failed {
                            sequence,
                            message: format!(
                                "node {} cannot hand its output to the next stage: {message}",
                                self.settings.node_name
                            ),
                            downstream: true,
                        },
                    ));
                }
            }
        }
        for (reply, answer) in answers {
            let _ = reply.send(answer).await;
        }
    }
}

/// What a forward produced.
enum Computed {
    Nothing,
    Hidden { tokens: u32, values: Vec<f32> },
    Sampled(u32),
    Logits(Vec<f32>),
}

/// Runs a batch of steps (each its own sequence) through the part's layers at once; one result per
/// step, in order. A step with bad input fails alone.
fn compute(part: &LoadedPart, batch: &mut [(Forward, Sequence)]) -> Vec<Result<Computed, String>> {
    let model = &part.model;
    let width = model.shape.embedding;
    let mut hidden = Vec::new();
    // Each step's rows in the batch, or why it has none.
    let rows: Vec<Result<usize, String>> = batch
        .iter_mut()
        .map(|(step, _)| {
            let values = match &mut step.input {
                StageInput::Tokens(ids) => model
                    .embed(ids)
                    .and_then(|rows| Ok(rows.flatten_all()?.to_vec1::<f32>()?))
                    .map_err(|error| error.to_string())?,
                StageInput::Hidden { tokens, values } => {
                    if values.len() != *tokens as usize * width || *tokens == 0 {
                        return Err(format!(
                            "{} hidden values for {tokens} tokens of width {width}",
                            values.len()
                        ));
                    }
                    std::mem::take(values)
                }
            };
            hidden.extend_from_slice(&values);
            Ok(values.len() / width)
        })
        .collect();
    let mut segments: Vec<Segment<'_>> = batch
        .iter_mut()
        .zip(&rows)
        .filter_map(|((step, sequence), rows)| {
            let tokens = *rows.as_ref().ok()?;
            sequence.cache.length = step.start as usize;
            Some(Segment {
                tokens,
                cache: &mut sequence.cache,
            })
        })
        .collect();
    let out = if segments.is_empty() {
        Ok(Vec::new())
    } else {
        model
            .layers_batch(hidden, &mut segments)
            .map_err(|error| error.to_string())
    };
    drop(segments);
    let out = match out {
        Ok(out) => out,
        Err(message) => {
            return rows
                .into_iter()
                .map(|rows| rows.and_then(|_| Err(message.clone())))
                .collect();
        }
    };
    // Each step's output rows, its cache advanced past them.
    let mut offset = 0;
    let outputs: Vec<Result<&[f32], String>> = batch
        .iter_mut()
        .zip(rows)
        .map(|((step, sequence), rows)| {
            let tokens = rows?;
            sequence.cache.length = step.start as usize + tokens;
            offset += tokens;
            Ok(&out[(offset - tokens) * width..offset * width])
        })
        .collect();
    if !part.spec.head {
        return outputs
            .into_iter()
            .map(|values| {
                let values = values?;
                Ok(Computed::Hidden {
                    tokens: u32::try_from(values.len() / width).unwrap_or(u32::MAX),
                    values: values.to_vec(),
                })
            })
            .collect();
    }
    last_stage_answers(model, batch, outputs)
}

/// The last stage's answers to a batch whose layers ran (`outputs`: each step's rows): the logits of every
/// step that wants them in one pass over the output matrix, then each step's logits or sampled token.
fn last_stage_answers(
    model: &Model,
    batch: &mut [(Forward, Sequence)],
    outputs: Vec<Result<&[f32], String>>,
) -> Vec<Result<Computed, String>> {
    let width = model.shape.embedding;
    let last_rows: Vec<f32> = batch
        .iter()
        .zip(&outputs)
        .filter(|((step, _), _)| step.output != Output::None)
        .filter_map(|(_, values)| values.as_ref().ok())
        .flat_map(|values| &values[values.len() - width..])
        .copied()
        .collect();
    let count = last_rows.len() / width;
    let logits = if count == 0 {
        Ok(Vec::new())
    } else {
        model
            .logits_rows(&last_rows, count)
            .map_err(|error| error.to_string())
    };
    let vocab = logits
        .as_ref()
        .map_or(0, |logits| logits.len() / count.max(1));
    let mut next = 0;
    batch
        .iter_mut()
        .zip(outputs)
        .map(|((step, sequence), values)| {
            values?;
            if step.output == Output::None {
                return Ok(Computed::Nothing);
            }
            let logits = logits.as_ref().map_err(Clone::clone)?;
            next += 1;
            let mine = &logits[(next - 1) * vocab..next * vocab];
            if step.output == Output::Logits {
                return Ok(Computed::Logits(mine.to_vec()));
            }
            let sampler = sequence
                .sampler
                .as_mut()
                .ok_or("the sequence was opened without sampling settings")?;
            let token = sampler.next(mine, &sequence.history);
            sequence.history.push(token);
            Ok(Computed::Sampled(token))
        })
        .collect()
}
