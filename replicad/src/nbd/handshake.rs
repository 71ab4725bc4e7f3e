//! The fixed newstyle handshake (option haggling) of one connection.
//!
//! Fault model: the client is untrusted. Every option is bounded
//! ([`proto::MAX_OPTION_DATA_BYTES`]), the number of options per connection is bounded
//! ([`MAX_OPTIONS`]) and the whole handshake runs under a timeout set by the caller.
//! Malformed framing (bad magic, absurd lengths, unknown client flags) ends the connection;
//! malformed option *data* is answered with `NBD_REP_ERR_INVALID` and haggling goes on.
//!
//! Metadata contexts: every export answers `base:allocation`, plus the names its
//! [`Export::meta_contexts`] lists. Query syntax (a namespace, a colon, a leaf name):
//!
//! - `NBD_OPT_LIST_META_CONTEXT`: no query lists every context; a query whose leaf name is
//!   empty or ends with a colon (`base:`, `qemu:`, `qemu:dirty-bitmap:`) lists every
//!   context it is a prefix of; any other query lists the context of exactly that name.
//!   Allowed before structured replies are negotiated (the spec lets a server refuse it).
//! - `NBD_OPT_SET_META_CONTEXT`: refused with `NBD_REP_ERR_INVALID` until structured
//!   replies are negotiated; selects the contexts named exactly (wildcards select
//!   nothing, unknown names are ignored) and gives each a context id unique on the
//!   connection. Every SET replaces the previous selection, also when it fails.
//! - A query without a colon is `NBD_REP_ERR_INVALID`; unknown export names are
//!   `NBD_REP_ERR_UNKNOWN`.
//!
//! The selection is used in transmission only if the client enters it with the export
//! it was made for.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::proto::{
    self, ClientFlags, Greeting, Info, InfoRequest, MetaContextRequest, OptionHeader,
};
use super::server::stopped;
use super::{Export, ExportSet, BASE_ALLOCATION};

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
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured_replies: bool,
    /// The metadata contexts selected for this export, in id order; empty if none.
    pub contexts: Vec<MetaContext>,
}

/// A metadata context selected with `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// What the options so far have negotiated.
struct Negotiated {
    structured_replies: bool,
    /// The export the last successful `NBD_OPT_SET_META_CONTEXT` named, and its contexts.
    /// The export's canonical name and the contexts selected for it. By name, not by
    /// the `Arc`: an export set may hand out a fresh export object per lookup.
    selection: Option<(String, Vec<MetaContext>)>,
    /// The next metadata context id to give out; ids are never reused on a connection.
    next_context_id: u32,
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
    if export.read_only() || !export.is_writable() {
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

    let mut negotiated = Negotiated {
        structured_replies: false,
        selection: None,
        next_context_id: 1,
    };
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
                let session = session(exports, name, export, &negotiated);
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
            proto::OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    // A repeated request is acknowledged again: it changes nothing.
                    negotiated.structured_replies = true;
                    proto::encode_option_reply(
                        &mut out,
                        proto::OPT_STRUCTURED_REPLY,
                        proto::REP_ACK,
                        &[],
                    );
                } else {
                    proto::encode_option_error(
                        &mut out,
                        proto::OPT_STRUCTURED_REPLY,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
            }
            proto::OPT_LIST_META_CONTEXT => list_meta_contexts(&mut out, exports, &data),
            proto::OPT_SET_META_CONTEXT => {
                set_meta_contexts(&mut out, exports, &data, &mut negotiated)
            }
            option @ (proto::OPT_INFO | proto::OPT_GO) => {
                if let Some(session) = info(&mut out, exports, option, &data, &negotiated) {
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

fn session<S: ExportSet>(
    exports: &S,
    name: &str,
    export: Arc<S::Export>,
    negotiated: &Negotiated,
) -> Session<S::Export> {
    let contexts = match &negotiated.selection {
        Some((selected, contexts)) if *selected == canonical_name(exports, name, &export) => {
            contexts.clone()
        }
        _ => Vec::new(),
    };
    Session {
        name: canonical_name(exports, name, &export),
        transmission_flags: transmission_flags(&*export),
        structured_replies: negotiated.structured_replies,
        contexts,
        export,
    }
}

/// The contexts `export` answers: `base:allocation` first, then the valid names of
/// [`Export::meta_contexts`] in their order, each once.
fn available_contexts<E: Export>(export: &E) -> Vec<String> {
    let mut names = vec![BASE_ALLOCATION.to_owned()];
    for name in export.meta_contexts() {
        let valid = proto::parse_string(name.as_bytes()).is_ok()
            && name
                .split_once(':')
                .is_some_and(|(namespace, _)| !namespace.is_empty());
        if !valid {
            warn!(
                name,
                "the export lists an invalid metadata context name; ignored"
            );
        } else if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Whether `query` is well formed: a non-empty namespace and a colon.
fn valid_query(query: &str) -> bool {
    query
        .split_once(':')
        .is_some_and(|(namespace, _)| !namespace.is_empty())
}

/// The contexts a `NBD_OPT_LIST_META_CONTEXT` with `queries` lists: all without queries;
/// for a query ending in a colon (an empty leaf name or a leaf-name prefix such as
/// `qemu:dirty-bitmap:`), every context it is a prefix of; otherwise the exact name.
pub(crate) fn list_matches(available: &[String], queries: &[&str]) -> Vec<String> {
    available
        .iter()
        .filter(|name| {
            queries.is_empty()
                || queries.iter().any(|query| {
                    if query.ends_with(':') {
                        name.starts_with(query)
                    } else {
                        name == query
                    }
                })
        })
        .cloned()
        .collect()
}

/// The contexts a `NBD_OPT_SET_META_CONTEXT` with `queries` selects: exact names only, so
/// no query selects nothing and wildcards select nothing.
pub(crate) fn set_matches(available: &[String], queries: &[&str]) -> Vec<String> {
    available
        .iter()
        .filter(|name| queries.iter().any(|query| name == query))
        .cloned()
        .collect()
}

/// Parses and checks the data of a metadata context option; on failure writes the error
/// reply and returns `None`.
fn meta_context_request<'a, S: ExportSet>(
    out: &mut Vec<u8>,
    exports: &S,
    option: u32,
    data: &'a [u8],
) -> Option<(MetaContextRequest<'a>, Arc<S::Export>)> {
    let request = match MetaContextRequest::parse(data) {
        Ok(request) => request,
        Err(error) => {
            warn!(option, %error, "malformed metadata context option data");
            proto::encode_option_error(
                out,
                option,
                proto::REP_ERR_INVALID,
                &format!("malformed option data: {error}"),
            );
            return None;
        }
    };
    if let Some(query) = request.queries.iter().find(|query| !valid_query(query)) {
        debug!(option, query, "metadata context query without a namespace");
        proto::encode_option_error(
            out,
            option,
            proto::REP_ERR_INVALID,
            &format!("query {query:?} does not start with a namespace and a colon"),
        );
        return None;
    }
    let Some(export) = exports.get(request.name) else {
        proto::encode_option_error(
            out,
            option,
            proto::REP_ERR_UNKNOWN,
            &format!("no export named {:?}", request.name),
        );
        return None;
    };
    Some((request, export))
}

/// Answers `NBD_OPT_LIST_META_CONTEXT`: one `NBD_REP_META_CONTEXT` (id 0) per match, then
/// `NBD_REP_ACK`.
fn list_meta_contexts<S: ExportSet>(out: &mut Vec<u8>, exports: &S, data: &[u8]) {
    let option = proto::OPT_LIST_META_CONTEXT;
    let Some((request, export)) = meta_context_request(out, exports, option, data) else {
        return;
    };
    for name in list_matches(&available_contexts(&*export), &request.queries) {
        proto::encode_rep_meta_context(out, option, 0, &name);
    }
    proto::encode_option_reply(out, option, proto::REP_ACK, &[]);
}

/// Answers `NBD_OPT_SET_META_CONTEXT` and replaces the selection (with none on error).
fn set_meta_contexts<S: ExportSet>(
    out: &mut Vec<u8>,
    exports: &S,
    data: &[u8],
    negotiated: &mut Negotiated,
) {
    let option = proto::OPT_SET_META_CONTEXT;
    negotiated.selection = None;
    if !negotiated.structured_replies {
        proto::encode_option_error(
            out,
            option,
            proto::REP_ERR_INVALID,
            "NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first",
        );
        return;
    }
    let Some((request, export)) = meta_context_request(out, exports, option, data) else {
        return;
    };
    let names = set_matches(&available_contexts(&*export), &request.queries);
    if names.len() > proto::MAX_SELECTED_CONTEXTS {
        proto::encode_option_error(
            out,
            option,
            proto::REP_ERR_TOO_BIG,
            &format!(
                "at most {} metadata contexts can be selected",
                proto::MAX_SELECTED_CONTEXTS
            ),
        );
        return;
    }
    let mut contexts = Vec::with_capacity(names.len());
    for name in names {
        let id = negotiated.next_context_id;
        negotiated.next_context_id = negotiated.next_context_id.wrapping_add(1).max(1);
        proto::encode_rep_meta_context(out, option, id, &name);
        contexts.push(MetaContext { id, name });
    }
    proto::encode_option_reply(out, option, proto::REP_ACK, &[]);
    negotiated.selection = Some((canonical_name(exports, request.name, &export), contexts));
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
    negotiated: &Negotiated,
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
    let session = session(exports, request.name, export, negotiated);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn meta_context_queries() {
        let available = names(&[
            "base:allocation",
            "qemu:dirty-bitmap:a",
            "qemu:dirty-bitmap:b",
        ]);
        // (queries, listed, selected)
        let rows: &[(&[&str], &[&str], &[&str])] = &[
            (
                &[],
                &[
                    "base:allocation",
                    "qemu:dirty-bitmap:a",
                    "qemu:dirty-bitmap:b",
                ],
                &[],
            ),
            (&["base:"], &["base:allocation"], &[]),
            (
                &["base:allocation"],
                &["base:allocation"],
                &["base:allocation"],
            ),
            (
                &["qemu:"],
                &["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"],
                &[],
            ),
            (
                &["qemu:dirty-bitmap:"],
                &["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"],
                &[],
            ),
            (
                &["qemu:dirty-bitmap:b"],
                &["qemu:dirty-bitmap:b"],
                &["qemu:dirty-bitmap:b"],
            ),
            // Unknown namespaces and leaf names find nothing; duplicates are listed once.
            (
                &["x-other:", "base:nothing", "qemu:dirty-bitmap:c"],
                &[],
                &[],
            ),
            (
                &[
                    "qemu:dirty-bitmap:a",
                    "base:allocation",
                    "qemu:dirty-bitmap:a",
                ],
                &["base:allocation", "qemu:dirty-bitmap:a"],
                &["base:allocation", "qemu:dirty-bitmap:a"],
            ),
            // A prefix that is not a whole namespace or ends in a colon matches exactly only.
            (&["qemu:dirty"], &[], &[]),
        ];
        for (queries, listed, selected) in rows {
            assert_eq!(
                list_matches(&available, queries),
                names(listed),
                "list {queries:?}"
            );
            assert_eq!(
                set_matches(&available, queries),
                names(selected),
                "set {queries:?}"
            );
        }
    }

    #[test]
    fn query_syntax() {
        assert!(valid_query("base:"));
        assert!(valid_query("x-a:b:c"));
        assert!(!valid_query("allocation"));
        assert!(!valid_query(":allocation"));
        assert!(!valid_query(""));
    }
}
