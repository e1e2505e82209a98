//! Running one sequence through a pipeline: opening it on every stage, feeding it tokens (prompts in
//! chunks, generation steps through the batcher) and closing it when it is dropped.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use sollol_shared::layers::{Forward, Output, Sampling, StageInput, StageReply, StageRequest};
use tokio::sync::{mpsc, oneshot};

use super::batch::Queued;
use super::{PROMPT_CHUNK, Pipeline, PipelineError};

impl Pipeline {
    /// Opens a sequence on every stage; the last one samples with `sampling` and knows `history`.
    pub async fn open(
        &self,
        sampling: Sampling,
        history: &[u32],
    ) -> Result<Sequence<'_>, PipelineError> {
        let id = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::unbounded_channel();
        for link in &self.links {
            link.routes
                .sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, sender.clone());
        }
        let mut sequence = Sequence {
            pipeline: self,
            id,
            replies: receiver,
            position: 0,
        };
        let last = self.links.len() - 1;
        for (index, link) in self.links.iter().enumerate() {
            link.send(&StageRequest::Open {
                sequence: id,
                sampling: (index == last).then(|| sampling.clone()),
                history: if index == last {
                    history.to_vec()
                } else {
                    Vec::new()
                },
            })
            .await?;
        }
        // Every stage must hold the sequence before the first forward reaches it.
        let mut opened = 0;
        while opened < self.links.len() {
            match sequence.next_reply(self.timeouts.handshake).await? {
                StageReply::Opened { .. } => opened += 1,
                other => return Err(sequence.unexpected(other)),
            }
        }
        Ok(sequence)
    }
}

/// One sequence running through a pipeline.
#[derive(Debug)]
pub struct Sequence<'a> {
    pipeline: &'a Pipeline,
    id: u64,
    replies: mpsc::UnboundedReceiver<(usize, StageReply)>,
    /// Tokens the stages have processed.
    pub position: usize,
}

/// What the last stage answered a forward with.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Token(u32),
    Logits(Vec<f32>),
}

impl Sequence<'_> {
    async fn next_reply(&mut self, timeout: Duration) -> Result<StageReply, PipelineError> {
        let name = |index: usize| {
            self.pipeline
                .links
                .get(index)
                .map(|link| link.name().to_owned())
                .unwrap_or_default()
        };
        match tokio::time::timeout(timeout, self.replies.recv()).await {
            Ok(Some((
                index,
                StageReply::Failed {
                    message,
                    downstream,
                    ..
                },
            ))) => {
                // A stage that cannot reach the next one blames the next one.
                let culprit = if downstream { index + 1 } else { index };
                Err(PipelineError::Stage {
                    node: name(culprit),
                    message,
                })
            }
            Ok(Some((_, reply))) => Ok(reply),
            Ok(None) => Err(PipelineError::Plan("the pipeline was dropped".to_owned())),
            Err(_) => Err(PipelineError::Stage {
                node: self
                    .pipeline
                    .links
                    .last()
                    .map(|link| link.name().to_owned())
                    .unwrap_or_default(),
                message: format!("no answer within {timeout:?}"),
            }),
        }
    }

    fn unexpected(&self, reply: StageReply) -> PipelineError {
        PipelineError::Protocol {
            node: "a stage".to_owned(),
            answer: format!("{reply:?}"),
        }
    }

    /// Runs `tokens` (a prompt, or the last generated token) through the stages and returns the last
    /// stage's answer for the final position: a sampled token, or the logits when `logits`.
    pub async fn feed(&mut self, tokens: &[u32], logits: bool) -> Result<Answer, PipelineError> {
        let first = &self.pipeline.links[0];
        let started = std::time::Instant::now();
        let chunks: Vec<&[u32]> = tokens.chunks(PROMPT_CHUNK).collect();
        let mut request_bytes = 0;
        // A generation step's share of the in-flight limit, until its answer is here.
        let mut in_flight = None;
        for (index, chunk) in chunks.iter().enumerate() {
            let output = match (index + 1 == chunks.len(), logits) {
                (false, _) => Output::None,
                (true, false) => Output::Sample,
                (true, true) => Output::Logits,
            };
            let step = Forward {
                sequence: self.id,
                start: u32::try_from(self.position).unwrap_or(u32::MAX),
                input: StageInput::Tokens(chunk.to_vec()),
                output,
                trace: Vec::new(),
            };
            // One step of a frame's bytes: the frame's few bytes of framing shared by the batch.
            request_bytes += postcard::experimental::serialized_size(&step).unwrap_or(0) + 4;
            if tokens.len() == 1 {
                // Generation steps of concurrent sequences travel together.
                let (sent, confirmed) = oneshot::channel();
                self.pipeline
                    .steps
                    .send(Queued { step, sent })
                    .map_err(|_| PipelineError::Plan("the pipeline was dropped".to_owned()))?;
                let permit = confirmed
                    .await
                    .map_err(|_| PipelineError::Plan("the pipeline was dropped".to_owned()))?
                    .map_err(|message| PipelineError::Stage {
                        node: first.name().to_owned(),
                        message,
                    })?;
                in_flight = Some(permit);
            } else {
                first
                    .send(&StageRequest::Forward { steps: vec![step] })
                    .await?;
            }
            self.position += chunk.len();
        }
        let timeout = self.pipeline.timeouts.step * u32::try_from(chunks.len().max(1)).unwrap_or(1);
        let reply = self.next_reply(timeout).await;
        drop(in_flight);
        let reply = reply?;
        let reply_bytes = postcard::experimental::serialized_size(&reply).unwrap_or(0) + 4;
        match reply {
            StageReply::Sampled { token, trace, .. } => {
                if tokens.len() == 1 {
                    self.pipeline
                        .record(started.elapsed(), request_bytes, &trace, reply_bytes);
                }
                Ok(Answer::Token(token))
            }
            StageReply::Logits { values, .. } => Ok(Answer::Logits(values)),
            other => Err(self.unexpected(other)),
        }
    }
}

impl Drop for Sequence<'_> {
    fn drop(&mut self) {
        for link in &self.pipeline.links {
            link.routes
                .sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.id);
            let link = Arc::clone(link);
            let sequence = self.id;
            // Best effort: a stage that is gone has forgotten the sequence anyway.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = link.send(&StageRequest::Close { sequence }).await;
                });
            }
        }
    }
}
