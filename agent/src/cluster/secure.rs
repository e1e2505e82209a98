//! The cluster and stage links after their handshake: every byte encrypted and authenticated.
//!
//! Once both sides have proved they hold the cluster token (the challenge–response in `wire`), they
//! run a Noise `NNpsk0` handshake (the `snow` crate) whose pre-shared key is derived from the token
//! and both nonces of that challenge: the keys are fresh ephemeral Diffie–Hellman keys bound to the
//! token and to this very connection. A relay in the middle (an impostor coordinator found over mDNS)
//! can pass the bytes on, but it can neither read nor change them: a record that fails
//! authentication (a flipped bit, a replayed, reordered, dropped or foreign record) ends the
//! connection with an error, and the agent reconnects.
//!
//! The byte stream is cut into records of a 2-byte big-endian length and a Noise transport message
//! (at most 65,535 bytes, 16 of them the tag), each sealed with the next nonce of its direction. The
//! frames of `wire` ride on top unchanged.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use snow::StatelessTransportState;
use sollol_shared::protocol::NONCE_BYTES;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::cluster::identity::ClusterToken;

const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Noise's largest message.
const MAX_RECORD: usize = 65_535;
const TAG: usize = 16;
const MAX_PLAIN: usize = MAX_RECORD - TAG;
/// Domain separation of the derived key from every other use of the token.
const KEY_CONTEXT: &[u8] = b"sollol link key v1\0";

/// The `link` of [`link_key`] for the agent ↔ coordinator link and for the layer protocol.
pub const CLUSTER_LINK: &[u8] = b"cluster";
pub const LAYER_LINK: &[u8] = b"layer";
/// The `link` of [`link_key`] between two coordinators of one cluster.
pub const GROUP_LINK: &[u8] = b"group";

/// Which end of a link: the side that dialled starts the Noise handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Dialler,
    Listener,
}

/// The pre-shared key of one connection: HMAC-SHA256(token, context ‖ link ‖ dialler's nonce ‖
/// listener's nonce). `link` names the protocol (cluster or layer), so one link's key is never another's.
pub fn link_key(
    token: &ClusterToken,
    link: &[u8],
    dialler_nonce: &[u8; NONCE_BYTES],
    listener_nonce: &[u8; NONCE_BYTES],
) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(KEY_CONTEXT);
    mac.update(link);
    mac.update(dialler_nonce);
    mac.update(listener_nonce);
    mac.finalize().into_bytes().into()
}

fn noise_error(error: snow::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("link encryption failed: {error}"),
    )
}

/// Runs the Noise handshake over `reader`/`writer` and returns the two encrypted halves.
pub async fn establish<R, W>(
    mut reader: R,
    mut writer: W,
    role: Role,
    key: &[u8; 32],
) -> io::Result<(SecureReader<R>, SecureWriter<W>)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let params = PATTERN.parse().map_err(noise_error)?;
    let builder = snow::Builder::new(params)
        .psk(0, key)
        .map_err(noise_error)?;
    let mut handshake = match role {
        Role::Dialler => builder.build_initiator(),
        Role::Listener => builder.build_responder(),
    }
    .map_err(noise_error)?;
    let mut message = vec![0u8; MAX_RECORD];
    let mut scratch = vec![0u8; MAX_RECORD];
    // -> e, psk   <- e, ee
    for turn in [Role::Dialler, Role::Listener] {
        if turn == role {
            let length = handshake
                .write_message(&[], &mut message)
                .map_err(noise_error)?;
            writer.write_all(&(length as u16).to_be_bytes()).await?;
            writer.write_all(&message[..length]).await?;
            writer.flush().await?;
        } else {
            let mut length = [0u8; 2];
            reader.read_exact(&mut length).await?;
            let length = usize::from(u16::from_be_bytes(length));
            reader.read_exact(&mut message[..length]).await?;
            handshake
                .read_message(&message[..length], &mut scratch)
                .map_err(noise_error)?;
        }
    }
    let transport = Arc::new(
        handshake
            .into_stateless_transport_mode()
            .map_err(noise_error)?,
    );
    Ok((
        SecureReader {
            inner: reader,
            transport: Arc::clone(&transport),
            nonce: 0,
            header: [0; 2],
            header_filled: 0,
            record: Vec::new(),
            record_filled: 0,
            plain: Vec::new(),
            plain_read: 0,
        },
        SecureWriter {
            inner: writer,
            transport,
            nonce: 0,
            plain: Vec::with_capacity(MAX_PLAIN),
            sealed: Vec::new(),
            sealed_written: 0,
        },
    ))
}

/// The reading half: yields the peer's bytes once their record has been authenticated.
pub struct SecureReader<R> {
    inner: R,
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    header: [u8; 2],
    header_filled: usize,
    record: Vec<u8>,
    record_filled: usize,
    plain: Vec<u8>,
    plain_read: usize,
}

impl<R> std::fmt::Debug for SecureReader<R> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SecureReader")
            .field("records", &self.nonce)
            .finish_non_exhaustive()
    }
}

/// Reads into `target` until it is full; `Ok(false)` on end of stream before any byte.
fn poll_fill<R: AsyncRead + Unpin>(
    inner: &mut R,
    context: &mut Context<'_>,
    target: &mut [u8],
    filled: &mut usize,
) -> Poll<io::Result<bool>> {
    while *filled < target.len() {
        let mut buffer = ReadBuf::new(&mut target[*filled..]);
        ready!(Pin::new(&mut *inner).poll_read(context, &mut buffer))?;
        let read = buffer.filled().len();
        if read == 0 {
            if *filled == 0 {
                return Poll::Ready(Ok(false));
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the link closed in the middle of a record",
            )));
        }
        *filled += read;
    }
    Poll::Ready(Ok(true))
}

impl<R: AsyncRead + Unpin> AsyncRead for SecureReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_read < this.plain.len() {
                let take = buffer.remaining().min(this.plain.len() - this.plain_read);
                buffer.put_slice(&this.plain[this.plain_read..this.plain_read + take]);
                this.plain_read += take;
                return Poll::Ready(Ok(()));
            }
            let mut header = this.header;
            let more = ready!(poll_fill(
                &mut this.inner,
                context,
                &mut header,
                &mut this.header_filled
            ));
            this.header = header;
            if !more? {
                return Poll::Ready(Ok(())); // the peer closed between records
            }
            let length = usize::from(u16::from_be_bytes(this.header));
            if length < TAG {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a link record is shorter than its tag",
                )));
            }
            this.record.resize(length, 0);
            match ready!(poll_fill(
                &mut this.inner,
                context,
                &mut this.record,
                &mut this.record_filled
            )) {
                Ok(true) => {}
                Ok(false) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the link closed in the middle of a record",
                    )));
                }
                Err(error) => return Poll::Ready(Err(error)),
            }
            this.plain.resize(length - TAG, 0);
            let opened = this
                .transport
                .read_message(this.nonce, &this.record, &mut this.plain)
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a link record failed authentication (altered, replayed, reordered or foreign)",
                    )
                })?;
            this.plain.truncate(opened);
            this.plain_read = 0;
            this.nonce = this
                .nonce
                .checked_add(1)
                .ok_or_else(|| io::Error::other("the link's record counter ran out; reconnect"))?;
            this.header_filled = 0;
            this.record_filled = 0;
        }
    }
}

/// The writing half: bytes are sealed into a record when it is full or on flush.
pub struct SecureWriter<W> {
    inner: W,
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    plain: Vec<u8>,
    sealed: Vec<u8>,
    sealed_written: usize,
}

impl<W> std::fmt::Debug for SecureWriter<W> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SecureWriter")
            .field("records", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> SecureWriter<W> {
    /// Seals the pending bytes into one record, to be written out.
    fn seal(&mut self) -> io::Result<()> {
        if self.plain.is_empty() {
            return Ok(());
        }
        self.sealed.clear();
        self.sealed.resize(2 + self.plain.len() + TAG, 0);
        let length = self
            .transport
            .write_message(self.nonce, &self.plain, &mut self.sealed[2..])
            .map_err(noise_error)?;
        self.sealed[..2].copy_from_slice(&(length as u16).to_be_bytes());
        self.sealed.truncate(2 + length);
        self.sealed_written = 0;
        self.plain.clear();
        self.nonce = self
            .nonce
            .checked_add(1)
            .ok_or_else(|| io::Error::other("the link's record counter ran out; reconnect"))?;
        Ok(())
    }

    /// Writes out the sealed record, if any.
    fn poll_drain(&mut self, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sealed_written < self.sealed.len() {
            let written = ready!(
                Pin::new(&mut self.inner).poll_write(context, &self.sealed[self.sealed_written..])
            )?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sealed_written += written;
        }
        self.sealed.clear();
        self.sealed_written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SecureWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(context))?;
        if this.plain.len() == MAX_PLAIN {
            this.seal()?;
            ready!(this.poll_drain(context))?;
        }
        let take = bytes.len().min(MAX_PLAIN - this.plain.len());
        this.plain.extend_from_slice(&bytes[..take]);
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(context))?;
        if !this.plain.is_empty() {
            this.seal()?;
            ready!(this.poll_drain(context))?;
        }
        Pin::new(&mut this.inner).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut *this).poll_flush(context))?;
        Pin::new(&mut this.inner).poll_shutdown(context)
    }
}

/// Both halves as one stream, for code that reads and writes in turn.
#[derive(Debug)]
pub struct SecureStream<R, W> {
    pub reader: SecureReader<R>,
    pub writer: SecureWriter<W>,
}

impl<R, W> SecureStream<R, W> {
    pub fn into_split(self) -> (SecureReader<R>, SecureWriter<W>) {
        (self.reader, self.writer)
    }
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for SecureStream<R, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().reader).poll_read(context, buffer)
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for SecureStream<R, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(context, bytes)
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(context)
    }
}

/// The encrypted TCP stream of a dialled or accepted link.
pub type SecureTcp = SecureStream<tokio::net::tcp::OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf>;

/// Encrypts `stream` after its handshake proved the token; `key` from [`link_key`].
pub async fn secure_tcp(
    stream: tokio::net::TcpStream,
    role: Role,
    key: &[u8; 32],
) -> io::Result<SecureTcp> {
    let (reader, writer) = stream.into_split();
    let (reader, writer) = establish(reader, writer, role, key).await?;
    Ok(SecureStream { reader, writer })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire;

    async fn pair(
        dialler_key: [u8; 32],
        listener_key: [u8; 32],
    ) -> io::Result<(
        SecureStream<
            tokio::io::ReadHalf<tokio::io::DuplexStream>,
            tokio::io::WriteHalf<tokio::io::DuplexStream>,
        >,
        SecureStream<
            tokio::io::ReadHalf<tokio::io::DuplexStream>,
            tokio::io::WriteHalf<tokio::io::DuplexStream>,
        >,
    )> {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (a_read, a_write) = tokio::io::split(a);
        let (b_read, b_write) = tokio::io::split(b);
        let (dialler, listener) = tokio::join!(
            establish(a_read, a_write, Role::Dialler, &dialler_key),
            establish(b_read, b_write, Role::Listener, &listener_key),
        );
        let (reader, writer) = dialler?;
        let dialler = SecureStream { reader, writer };
        let (reader, writer) = listener?;
        Ok((dialler, SecureStream { reader, writer }))
    }

    #[tokio::test]
    async fn frames_of_any_size_cross_the_link_in_both_directions() {
        let (mut dialler, mut listener) = pair([7; 32], [7; 32]).await.expect("handshake");
        let big: Vec<u8> = (0..300_000u32).map(|index| index as u8).collect();
        for payload in [Vec::new(), b"report".to_vec(), big] {
            wire::write_message_within(&mut dialler, &payload, 1 << 20)
                .await
                .expect("write");
            let received: Vec<u8> = wire::read_message_within(&mut listener, 1 << 20)
                .await
                .expect("read");
            assert_eq!(received, payload);
            wire::write_message_within(&mut listener, &payload, 1 << 20)
                .await
                .expect("write back");
            let echoed: Vec<u8> = wire::read_message_within(&mut dialler, 1 << 20)
                .await
                .expect("read back");
            assert_eq!(echoed, payload);
        }
    }

    #[tokio::test]
    async fn different_keys_never_make_a_link() {
        assert!(pair([7; 32], [8; 32]).await.is_err());
    }

    #[test]
    fn keys_bind_the_token_the_link_and_both_nonces() {
        let token = ClusterToken::parse("0123456789abcdef0123456789abcdef").expect("token");
        let other = ClusterToken::parse("0123456789abcdef0123456789abcdee").expect("token");
        let key = link_key(&token, b"cluster", &[1; NONCE_BYTES], &[2; NONCE_BYTES]);
        assert_ne!(
            key,
            link_key(&other, b"cluster", &[1; NONCE_BYTES], &[2; NONCE_BYTES])
        );
        assert_ne!(
            key,
            link_key(&token, b"layer", &[1; NONCE_BYTES], &[2; NONCE_BYTES])
        );
        assert_ne!(
            key,
            link_key(&token, b"cluster", &[2; NONCE_BYTES], &[1; NONCE_BYTES])
        );
        assert_ne!(
            key,
            link_key(&token, b"cluster", &[1; NONCE_BYTES], &[3; NONCE_BYTES])
        );
    }

    /// What a relay between the two ends does to the dialler's records after the handshake.
    #[derive(Clone, Copy, Debug)]
    enum Tamper {
        Nothing,
        FlipBit,
        Replay,
        Reorder,
        Drop,
    }

    /// Reads one length-prefixed record (handshake messages and transport records share the framing).
    async fn record<R: AsyncRead + Unpin>(reader: &mut R) -> Option<Vec<u8>> {
        let mut length = [0u8; 2];
        reader.read_exact(&mut length).await.ok()?;
        let mut record = length.to_vec();
        record.resize(2 + usize::from(u16::from_be_bytes(length)), 0);
        reader.read_exact(&mut record[2..]).await.ok()?;
        Some(record)
    }

    /// Sends "one", "two", "three" through a tampering relay; returns the messages the listener
    /// read before its link failed (or ended).
    async fn through_relay(tamper: Tamper) -> (Vec<String>, Option<io::Error>) {
        let (dialler_end, mut relay_in) = tokio::io::duplex(1 << 16);
        let (mut relay_out, listener_end) = tokio::io::duplex(1 << 16);
        let relay = tokio::spawn(async move {
            let (mut from_dialler, mut to_dialler) = tokio::io::split(&mut relay_in);
            let (mut from_listener, mut to_listener) = tokio::io::split(&mut relay_out);
            // The handshake passes untouched: first the dialler's message, then the listener's.
            let first = record(&mut from_dialler).await.expect("message 1");
            to_listener.write_all(&first).await.expect("relay");
            let second = record(&mut from_listener).await.expect("message 2");
            to_dialler.write_all(&second).await.expect("relay");
            let mut records = Vec::new();
            for _ in 0..3 {
                records.push(record(&mut from_dialler).await.expect("record"));
            }
            let sent = match tamper {
                Tamper::Nothing => records,
                Tamper::FlipBit => {
                    let mut flipped = records.clone();
                    let last = flipped[1].len() - 1;
                    flipped[1][last] ^= 0x01;
                    flipped
                }
                Tamper::Replay => vec![records[0].clone(), records[0].clone(), records[1].clone()],
                Tamper::Reorder => vec![records[1].clone(), records[0].clone(), records[2].clone()],
                Tamper::Drop => vec![records[0].clone(), records[2].clone()],
            };
            for record in sent {
                to_listener.write_all(&record).await.expect("relay");
            }
            to_listener.shutdown().await.expect("close");
        });
        let (a_read, a_write) = tokio::io::split(dialler_end);
        let (b_read, b_write) = tokio::io::split(listener_end);
        let dialler = async {
            let (_reader, mut writer) = establish(a_read, a_write, Role::Dialler, &[5; 32])
                .await
                .expect("dialler handshake");
            for text in ["one", "two", "three"] {
                wire::write_message(&mut writer, &text.to_owned())
                    .await
                    .expect("write");
            }
            writer
        };
        let listener = async {
            let (mut reader, _writer) = establish(b_read, b_write, Role::Listener, &[5; 32])
                .await
                .expect("listener handshake");
            let mut read = Vec::new();
            loop {
                match wire::read_message::<String, _>(&mut reader).await {
                    Ok(text) => read.push(text),
                    Err(wire::FrameError::Io(error)) => return (read, Some(error)),
                    Err(_) => return (read, None),
                }
            }
        };
        let (_writer, outcome) = tokio::join!(dialler, listener);
        relay.await.expect("relay");
        outcome
    }

    #[tokio::test]
    async fn an_altered_record_ends_the_link() {
        let (read, error) = through_relay(Tamper::Nothing).await;
        assert_eq!(read, ["one", "two", "three"]);
        assert!(error.is_none(), "{error:?}");
        for (tamper, intact) in [
            (Tamper::FlipBit, 1),
            (Tamper::Replay, 1),
            (Tamper::Reorder, 0),
            (Tamper::Drop, 1),
        ] {
            let (read, error) = through_relay(tamper).await;
            assert_eq!(read.len(), intact, "{tamper:?}: {read:?}");
            let error = error.unwrap_or_else(|| panic!("{tamper:?} went unnoticed"));
            assert!(
                error.to_string().contains("failed authentication"),
                "{tamper:?}: {error}"
            );
        }
    }
}
