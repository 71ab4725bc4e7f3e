//! The fixed newstyle handshake (option haggling) of one connection.
//!
//! Fault model: the client is untrusted. Every option is bounded
//! ([`proto::MAX_OPTION_DATA_BYTES`]), the number of options per connection is bounded
//! ([`MAX_OPTIONS`]) and the whole handshake runs under a timeout set by the caller.
//! Malformed framing (bad magic, absurd lengths, unknown client flags) ends the connection;
//! malformed option *data* is answered with `NBD_REP_ERR_INVALID` and haggling goes on.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::proto::{self, ClientFlags, Greeting, Info, InfoRequest, OptionHeader};
use super::server::stopped;
use super::{Export, ExportSet};

/// The most options one connection may send before entering transmission. Real clients
/// send a handful (nbdinfo `--list` sends two per export).
pub(crate) const MAX_OPTIONS: usize = 1024;

/// The result of a successful handshake.
pub(crate) enum Outcome<E> {
    /// The client chose an export and the transmission phase begins.
    Transmission(Session<E>),
    /// The client aborted, or the server is shutting down.
    Closed,
}

/// What the transmission phase needs to know about the negotiated export.
pub(crate) struct Session<E> {
    pub export: Arc<E>,
    pub name: String,
    pub transmission_flags: u16,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("I/O error during the handshake")]
    Io(#[from] std::io::Error),
    #[error("protocol violation during the handshake")]
    Protocol(#[from] proto::ProtocolError),
    #[error("NBD_OPT_EXPORT_NAME asked for the unknown export {0:?}")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME while the server is shutting down")]
    ShuttingDown,
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

/// The transmission flags of `export`, computed when the client enters transmission (or
/// asks with `NBD_OPT_INFO`).
pub(crate) fn transmission_flags<E: Export>(export: &E) -> u16 {
    let mut flags = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_TRIM
        | proto::FLAG_SEND_WRITE_ZEROES;
    if !export.is_writable() {
        flags |= proto::FLAG_READ_ONLY;
    }
    if export.can_multi_conn() {
        flags |= proto::FLAG_CAN_MULTI_CONN;
    }
    flags
}

/// The export's minimum block size, forced into the range the protocol allows. An export
/// that reports an invalid value has a bug; serving it with a valid value is safer than
/// refusing the client.
pub(crate) fn minimum_block_size<E: Export>(export: &E) -> u32 {
    let reported = export.minimum_block_size();
    debug_assert!(
        reported.is_power_of_two() && reported <= proto::MAX_MINIMUM_BLOCK_SIZE,
        "invalid minimum block size {reported}"
    );
    reported
        .clamp(1, proto::MAX_MINIMUM_BLOCK_SIZE)
        .next_power_of_two()
}

/// Runs the handshake from the greeting to the start of transmission.
pub(crate) async fn negotiate<R, W, S>(
    reader: &mut R,
    writer: &mut W,
    exports: &S,
    stop: &mut watch::Receiver<bool>,
) -> Result<Outcome<S::Export>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: ExportSet,
{
    let mut out = Vec::with_capacity(256);
    Greeting {
        handshake_flags: proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
    }
    .encode(&mut out);
    writer.write_all(&out).await?;

    let mut raw_flags = [0u8; proto::CLIENT_FLAGS_BYTES];
    reader.read_exact(&mut raw_flags).await?;
    let client_flags = ClientFlags::parse(&raw_flags)?;

    for _ in 0..MAX_OPTIONS {
        let mut raw_header = [0u8; proto::OPTION_HEADER_BYTES];
        tokio::select! {
            biased;
            () = stopped(stop) => return Ok(Outcome::Closed),
            read = reader.read_exact(&mut raw_header) => { read?; }
        }
        let header = OptionHeader::parse(&raw_header, proto::MAX_OPTION_DATA_BYTES)?;
        // Bounded by MAX_OPTION_DATA_BYTES above.
        let mut data = vec![0u8; header.length as usize];
        reader.read_exact(&mut data).await?;

        out.clear();
        let shutting_down = *stop.borrow();
        match header.option {
            proto::OPT_EXPORT_NAME => {
                if shutting_down {
                    return Err(HandshakeError::ShuttingDown);
                }
                let name = proto::parse_string(&data)?;
                let Some(export) = exports.get(name) else {
                    return Err(HandshakeError::UnknownExport(name.to_owned()));
                };
                let session = session(exports, name, export);
                proto::encode_export_name_reply(
                    &mut out,
                    session.export.size_bytes(),
                    session.transmission_flags,
                    client_flags.no_zeroes,
                );
                writer.write_all(&out).await?;
                return Ok(Outcome::Transmission(session));
            }
            proto::OPT_ABORT => {
                proto::encode_option_reply(&mut out, proto::OPT_ABORT, proto::REP_ACK, &[]);
                // The client may already have closed the connection, as the spec allows.
                let _ = writer.write_all(&out).await;
                return Ok(Outcome::Closed);
            }
            option if shutting_down => proto::encode_option_error(
                &mut out,
                option,
                proto::REP_ERR_SHUTDOWN,
                "the server is shutting down",
            ),
            proto::OPT_LIST => list(&mut out, exports, &data),
            option @ (proto::OPT_INFO | proto::OPT_GO) => {
                if let Some(session) = info(&mut out, exports, option, &data) {
                    writer.write_all(&out).await?;
                    if option == proto::OPT_GO {
                        return Ok(Outcome::Transmission(session));
                    }
                    continue;
                }
            }
            option => {
                debug!(option, "unsupported option");
                proto::encode_option_error(
                    &mut out,
                    option,
                    proto::REP_ERR_UNSUP,
                    &format!("option {option} is not supported by replicad"),
                );
            }
        }
        writer.write_all(&out).await?;
    }
    Err(HandshakeError::TooManyOptions)
}

fn session<S: ExportSet>(exports: &S, name: &str, export: Arc<S::Export>) -> Session<S::Export> {
    Session {
        name: canonical_name(exports, name, &export),
        transmission_flags: transmission_flags(&*export),
        export,
    }
}

/// The name under which `export` is listed: the requested name, unless the client asked
/// for the default export with the empty name.
fn canonical_name<S: ExportSet>(exports: &S, requested: &str, export: &Arc<S::Export>) -> String {
    if !requested.is_empty() {
        return requested.to_owned();
    }
    exports
        .names()
        .into_iter()
        .find(|name| {
            exports
                .get(name)
                .is_some_and(|candidate| Arc::ptr_eq(&candidate, export))
        })
        .unwrap_or_default()
}

/// Answers `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
fn list<S: ExportSet>(out: &mut Vec<u8>, exports: &S, data: &[u8]) {
    if !data.is_empty() {
        warn!(length = data.len(), "NBD_OPT_LIST with data");
        proto::encode_option_error(
            out,
            proto::OPT_LIST,
            proto::REP_ERR_INVALID,
            "NBD_OPT_LIST takes no data",
        );
        return;
    }
    for name in exports.names() {
        proto::encode_rep_server(out, &name);
    }
    proto::encode_option_reply(out, proto::OPT_LIST, proto::REP_ACK, &[]);
}

/// Answers `NBD_OPT_INFO` or `NBD_OPT_GO`. Returns the session when the reply ends with
/// `NBD_REP_ACK`.
fn info<S: ExportSet>(
    out: &mut Vec<u8>,
    exports: &S,
    option: u32,
    data: &[u8],
) -> Option<Session<S::Export>> {
    let request = match InfoRequest::parse(data) {
        Ok(request) => request,
        Err(error) => {
            warn!(option, %error, "malformed NBD_OPT_INFO/GO data");
            proto::encode_option_error(
                out,
                option,
                proto::REP_ERR_INVALID,
                &format!("malformed option data: {error}"),
            );
            return None;
        }
    };
    let Some(export) = exports.get(request.name) else {
        debug!(name = request.name, "unknown export");
        proto::encode_option_error(
            out,
            option,
            proto::REP_ERR_UNKNOWN,
            &format!("no export named {:?}", request.name),
        );
        return None;
    };
    let session = session(exports, request.name, export);
    Info::Export {
        size_bytes: session.export.size_bytes(),
        transmission_flags: session.transmission_flags,
    }
    .encode_reply(out, option);
    // Optional items go out only when asked for, each at most once, whatever order or
    // repetition the client used; unknown requests are ignored as the spec says.
    if request.info_types.contains(&proto::INFO_NAME) {
        Info::Name(session.name.clone()).encode_reply(out, option);
    }
    if request.info_types.contains(&proto::INFO_BLOCK_SIZE) {
        let minimum = minimum_block_size(&*session.export);
        Info::BlockSize {
            minimum,
            preferred: proto::PREFERRED_BLOCK_SIZE.max(minimum),
            maximum: proto::MAX_PAYLOAD_BYTES,
        }
        .encode_reply(out, option);
    }
    proto::encode_option_reply(out, option, proto::REP_ACK, &[]);
    Some(session)
}
