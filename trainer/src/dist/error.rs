//! The one error type of the distributed layer. Multi-process failures are
//! hard to debug from a log line, so every variant names what is wrong: the
//! environment variable, the store key, the rank that went missing, or both
//! values that disagree.

use std::fmt;
use std::io;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("environment variable {var} is required {context}")]
    MissingEnv { var: String, context: String },

    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    BadEnv {
        var: String,
        value: String,
        reason: String,
    },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "rank {rank} could not reach the rendezvous store at {addr} within {timeout:?} \
         (is rank 0 running, and are MASTER_ADDR/MASTER_PORT right?): {source}"
    )]
    StoreUnreachable {
        rank: usize,
        addr: String,
        timeout: Duration,
        #[source]
        source: io::Error,
    },

    #[error("rendezvous store at {addr} (hosted by rank 0) failed while {what}: {source}")]
    StoreLost {
        addr: String,
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("rendezvous store refused {what}: {reason}")]
    StoreRefused { what: String, reason: String },

    #[error("timed out after {timeout:?} waiting for store key(s) {missing:?}{}", never_connected_note(.never_connected))]
    StoreTimeout {
        missing: Vec<String>,
        never_connected: Vec<usize>,
        timeout: Duration,
    },

    #[error(
        "{what} timed out after {timeout:?}: rank(s) {missing:?} of {world} never arrived{}",
        never_connected_note(.never_connected)
    )]
    RanksMissing {
        what: String,
        missing: Vec<usize>,
        world: usize,
        never_connected: Vec<usize>,
        timeout: Duration,
    },

    #[error(
        "{what} failed: rank(s) {dead:?} lost their connection to the rendezvous store \
         without shutting down (crashed or killed?)"
    )]
    RanksDied { what: String, dead: Vec<usize> },

    #[error("{what} differs between ranks: rank 0 has {expected:?}, rank {rank} has {found:?}")]
    Mismatch {
        what: &'static str,
        rank: usize,
        expected: String,
        found: String,
    },

    #[error("{op} (collective #{seq}) failed: {}", PeerList(.failures))]
    Collective {
        op: &'static str,
        seq: u64,
        failures: Vec<PeerFailure>,
    },

    #[error(
        "communicator is unusable after an earlier failure ({0}); \
         collectives cannot resume once a peer stream is broken"
    )]
    Poisoned(String),

    #[error("{op}: {detail}")]
    BadArgument { op: &'static str, detail: String },

    #[error("setting up connections for {what}: {detail}")]
    Mesh { what: String, detail: String },

    #[error("launching local worker {local_rank} ({program}): {source}")]
    Spawn {
        local_rank: usize,
        program: String,
        #[source]
        source: io::Error,
    },
}

/// What went wrong with one peer during a collective.
#[derive(Debug, Clone)]
pub struct PeerFailure {
    /// Global rank of the peer (the one users see in logs), not its rank in a sub-group.
    pub rank: usize,
    pub kind: PeerFailureKind,
}

#[derive(Debug, Clone)]
pub enum PeerFailureKind {
    /// EOF or reset: the peer process exited or crashed.
    Closed(String),
    /// Nothing arrived (or could be sent) within the configured timeout.
    TimedOut(Duration),
    /// The peer sent a different collective, sequence number or size: ranks
    /// called collectives in different orders or with different buffer sizes.
    OutOfStep(String),
    /// The peer gave up on this collective for the reason it sent.
    Aborted(String),
    Other(String),
}

impl fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.rank;
        match &self.kind {
            PeerFailureKind::Closed(e) => write!(
                f,
                "rank {r} closed its connection ({e}); did that process exit or crash?"
            ),
            PeerFailureKind::TimedOut(t) => write!(f, "rank {r} did not respond within {t:?}"),
            PeerFailureKind::OutOfStep(e) => write!(f, "rank {r} is out of step: {e}"),
            PeerFailureKind::Aborted(why) => write!(f, "rank {r} aborted ({why})"),
            PeerFailureKind::Other(e) => write!(f, "rank {r}: {e}"),
        }
    }
}

struct PeerList<'a>(&'a [PeerFailure]);

impl fmt::Display for PeerList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

fn never_connected_note(ranks: &[usize]) -> String {
    if ranks.is_empty() {
        String::new()
    } else {
        format!(" (rank(s) {ranks:?} never connected to the store)")
    }
}

impl DistError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        DistError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn bad_arg(op: &'static str, detail: impl Into<String>) -> Self {
        DistError::BadArgument {
            op,
            detail: detail.into(),
        }
    }
}
