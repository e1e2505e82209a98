//! A request body that fails when the client stops sending it: a stalled or trickling upload must not
//! hold a connection, a task and a buffer forever.
//!
//! The clock restarts with every chunk, so a large upload over a slow link passes as long as it moves.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The error a stalled body ends with; the gateway answers it with HTTP 408.
#[derive(Debug)]
pub struct BodyStalled {
    pub after: Duration,
}

impl fmt::Display for BodyStalled {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "the request body stopped arriving for {} ms",
            self.after.as_millis()
        )
    }
}

impl std::error::Error for BodyStalled {}

/// Wraps `body` so that a gap of more than `idle` between two chunks ends it with [`BodyStalled`].
pub fn with_idle_timeout(body: Body, idle: Duration) -> Body {
    Body::new(IdleTimeout {
        inner: body,
        idle,
        deadline: Box::pin(tokio::time::sleep(idle)),
    })
}

/// Whether `error` (or what caused it) is a [`BodyStalled`].
pub fn is_stalled(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<BodyStalled>() {
            return true;
        }
        current = error.source();
    }
    false
}

struct IdleTimeout {
    inner: Body,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl HttpBody for IdleTimeout {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(context) {
            Poll::Ready(frame) => {
                let idle = this.idle;
                this.deadline.as_mut().reset(Instant::now() + idle);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.deadline.as_mut().poll(context) {
                Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyStalled {
                    after: this.idle,
                })))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_coming_passes() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, axum::Error>>(1);
        let body = with_idle_timeout(
            Body::new(http_body_util::StreamBody::new(tokio_stream_from(receiver))),
            Duration::from_secs(1),
        );
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                let _ = sender
                    .send(Ok(Frame::data(Bytes::from_static(b"ab"))))
                    .await;
            }
        });
        let collected = body.collect().await.map(|body| body.to_bytes());
        assert_eq!(collected.ok().as_deref(), Some(&b"ababababab"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_as_stalled() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, axum::Error>>(1);
        let body = with_idle_timeout(
            Body::new(http_body_util::StreamBody::new(tokio_stream_from(receiver))),
            Duration::from_secs(1),
        );
        tokio::spawn(async move {
            let _ = sender
                .send(Ok(Frame::data(Bytes::from_static(b"ab"))))
                .await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(sender);
        });
        let Err(error) = body.collect().await else {
            panic!("a stalled body must fail");
        };
        assert!(is_stalled(&error), "{error}");
    }

    fn tokio_stream_from<T: Send + 'static>(
        receiver: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send {
        futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        })
    }
}
