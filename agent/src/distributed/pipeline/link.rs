//! The coordinator's connection to one stage: requests out, and each answer routed to the sequence it
//! names or, when it names none, to whoever asked (the plan's driver).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sollol_shared::layers::{MAX_LAYER_FRAME_BYTES, StageReply, StageRequest};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

use super::PipelineError;
use crate::cluster::identity::ClusterToken;
use crate::cluster::secure::SecureWriter;
use crate::cluster::wire;
use crate::distributed::stage::{StagePeer, dial};

/// A connection to one stage, its answers routed to whoever waits for them.
#[derive(Debug)]
pub(super) struct Link {
    peer: StagePeer,
    pub(super) address: String,
    writer: tokio::sync::Mutex<SecureWriter<OwnedWriteHalf>>,
    pub(super) routes: Arc<Routes>,
}

/// Where a stage's answers go: per sequence, or (answers that name none) to the plan's driver.
#[derive(Debug, Default)]
pub(super) struct Routes {
    /// Answers with the index of the stage they came from.
    pub(super) sequences: Mutex<HashMap<u64, mpsc::UnboundedSender<(usize, StageReply)>>>,
    control: Mutex<Option<mpsc::UnboundedSender<StageReply>>>,
    /// Why the connection ended, once it has.
    lost: Mutex<Option<String>>,
}

fn sequence_of(reply: &StageReply) -> Option<u64> {
    match reply {
        StageReply::Opened { sequence }
        | StageReply::Sampled { sequence, .. }
        | StageReply::Logits { sequence, .. }
        | StageReply::Closed { sequence }
        | StageReply::Failed { sequence, .. } => Some(*sequence),
        _ => None,
    }
}

impl Link {
    pub(super) async fn open(
        index: usize,
        address: &str,
        token: &ClusterToken,
        timeout: Duration,
    ) -> Result<Arc<Self>, PipelineError> {
        let (stream, peer) = dial(address, token, timeout).await?;
        let (mut reader, writer) = stream.into_split();
        let routes = Arc::new(Routes::default());
        let reading = Arc::clone(&routes);
        tokio::spawn(async move {
            let reason = loop {
                match wire::read_message_within::<StageReply, _>(&mut reader, MAX_LAYER_FRAME_BYTES)
                    .await
                {
                    Ok(reply) => match sequence_of(&reply) {
                        Some(sequence) => {
                            let route = reading
                                .sequences
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get(&sequence)
                                .cloned();
                            if let Some(route) = route {
                                let _ = route.send((index, reply));
                            }
                        }
                        None => {
                            let route = reading
                                .control
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .clone();
                            if let Some(route) = route {
                                let _ = route.send(reply);
                            }
                        }
                    },
                    Err(error) => break error.to_string(),
                }
            };
            *reading.lost.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.clone());
            // Everyone waiting on this stage hears that it is gone.
            let waiting: Vec<_> = reading
                .sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(sequence, route)| (*sequence, route.clone()))
                .collect();
            for (sequence, route) in waiting {
                let _ = route.send((
                    index,
                    StageReply::Failed {
                        sequence,
                        message: format!("connection lost: {reason}"),
                        downstream: false,
                    },
                ));
            }
            reading
                .control
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
        });
        Ok(Arc::new(Self {
            peer,
            address: address.to_owned(),
            writer: tokio::sync::Mutex::new(writer),
            routes,
        }))
    }

    pub(super) fn name(&self) -> &str {
        &self.peer.node_name
    }

    pub(super) async fn send(&self, request: &StageRequest) -> Result<(), PipelineError> {
        if let Some(reason) = self
            .routes
            .lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(PipelineError::Stage {
                node: self.name().to_owned(),
                message: format!("connection lost: {reason}"),
            });
        }
        let mut writer = self.writer.lock().await;
        wire::write_message_within(&mut *writer, request, MAX_LAYER_FRAME_BYTES)
            .await
            .map_err(|error| PipelineError::Stage {
                node: self.name().to_owned(),
                message: error.to_string(),
            })
    }

    /// Sends a request whose answer names no sequence and waits for that answer.
    pub(super) async fn ask(
        &self,
        request: &StageRequest,
        timeout: Duration,
    ) -> Result<StageReply, PipelineError> {
        self.ask_reporting(request, timeout, &|_, _| {}).await
    }

    /// [`Link::ask`], passing the [`StageReply::Fetching`] progress that comes first to `fetching`
    /// (bytes so far, in all); `timeout` runs from the last message.
    pub(super) async fn ask_reporting(
        &self,
        request: &StageRequest,
        timeout: Duration,
        fetching: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<StageReply, PipelineError> {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        *self
            .routes
            .control
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(sender);
        self.send(request).await?;
        let answer = loop {
            match tokio::time::timeout(timeout, receiver.recv()).await {
                Ok(Some(StageReply::Fetching {
                    done_bytes,
                    total_bytes,
                })) => fetching(done_bytes, total_bytes),
                other => break other,
            }
        };
        match answer {
            Ok(Some(StageReply::Refused(refusal))) => Err(PipelineError::Refused {
                node: self.name().to_owned(),
                message: refusal.message,
            }),
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err(PipelineError::Stage {
                node: self.name().to_owned(),
                message: "connection lost".to_owned(),
            }),
            Err(_) => Err(PipelineError::Stage {
                node: self.name().to_owned(),
                message: format!("no answer within {timeout:?}"),
            }),
        }
    }
}
