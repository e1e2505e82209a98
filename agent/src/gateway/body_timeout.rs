//! A request body that fails when the client sends it too slowly: a stalled upload (no bytes for the
//! idle time) or a trickling one (some bytes now and then, never finishing) must not hold a
//! connection, a task and a buffer forever.
//!
//! The idle clock restarts with every chunk, so a large upload over a slow link passes as long as it
//! moves; the total clock does not, so even a moving upload ends by its deadline.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use hyper::body::{Body as HttpBody, Bytes, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Why a body was abandoned; the gateway answers it with HTTP 408.
#[derive(Debug)]
pub enum BodyTooSlow {
    /// No bytes arrived for this long.
    Stalled(Duration),
    /// The whole body had not arrived after this long.
    Overdue(Duration),
}

impl fmt::Display for BodyTooSlow {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stalled(after) => write!(
                formatter,
                "the request body stopped arriving for {} ms",
                after.as_millis()
            ),
            Self::Overdue(after) => write!(
                formatter,
                "the request body was still arriving after {} s (coordinator.body_deadline)",
                after.as_secs()
            ),
        }
    }
}

impl std::error::Error for BodyTooSlow {}

/// Wraps `body` so that a gap of more than `idle` between two chunks, or a body still arriving after
/// `total`, ends it with [`BodyTooSlow`].
pub fn with_timeouts(body: Body, idle: Duration, total: Duration) -> Body {
    Body::new(Timed {
        inner: body,
        idle,
        total,
        idle_deadline: Box::pin(tokio::time::sleep(idle)),
        total_deadline: Box::pin(tokio::time::sleep(total)),
    })
}

/// Whether `error` (or what caused it) is a [`BodyTooSlow`].
pub fn is_too_slow(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<BodyTooSlow>() {
            return true;
        }
        current = error.source();
    }
    false
}

struct Timed {
    inner: Body,
    idle: Duration,
    total: Duration,
    idle_deadline: Pin<Box<Sleep>>,
    total_deadline: Pin<Box<Sleep>>,
}

impl HttpBody for Timed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if this.total_deadline.as_mut().poll(context).is_ready() {
            return Poll::Ready(Some(Err(axum::Error::new(BodyTooSlow::Overdue(
                this.total,
            )))));
        }
        match Pin::new(&mut this.inner).poll_frame(context) {
            Poll::Ready(frame) => {
                let idle = this.idle;
                this.idle_deadline.as_mut().reset(Instant::now() + idle);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.idle_deadline.as_mut().poll(context) {
                Poll::Ready(()) => {
                    Poll::Ready(Some(Err(axum::Error::new(BodyTooSlow::Stalled(this.idle)))))
                }
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
        let body = with_timeouts(
            Body::new(http_body_util::StreamBody::new(tokio_stream_from(receiver))),
            Duration::from_secs(1),
            Duration::from_secs(60),
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
        let body = with_timeouts(
            Body::new(http_body_util::StreamBody::new(tokio_stream_from(receiver))),
            Duration::from_secs(1),
            Duration::from_secs(60),
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
        assert!(is_too_slow(&error), "{error}");
        assert!(error.to_string().contains("stopped arriving"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_body_ends_at_its_deadline() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, axum::Error>>(1);
        let body = with_timeouts(
            Body::new(http_body_util::StreamBody::new(tokio_stream_from(receiver))),
            Duration::from_secs(1),
            Duration::from_secs(10),
        );
        tokio::spawn(async move {
            // One byte every 900 ms, for ever: never idle for a whole second.
            while sender
                .send(Ok(Frame::data(Bytes::from_static(b"a"))))
                .await
                .is_ok()
            {
                tokio::time::sleep(Duration::from_millis(900)).await;
            }
        });
        let started = Instant::now();
        let Err(error) = body.collect().await else {
            panic!("a trickled body must fail");
        };
        assert!(is_too_slow(&error), "{error}");
        assert!(error.to_string().contains("still arriving"), "{error}");
        assert_eq!(started.elapsed().as_secs(), 10);
    }

    fn tokio_stream_from<T: Send + 'static>(
        receiver: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send {
        futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        })
    }
}
