//! The replication core's vocabulary and rules (sans-IO).
//!
//! States as DRBD users know them, the role rules (who may promote, and when force is
//! needed), and the acknowledgement rules per mode (what a client write waits for).
//! No sockets, no clocks: the state machine (`crate::node`) asks, tests drive every
//! case directly.

use std::fmt;

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

/// A node's disk state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskState {
    UpToDate,
    Inconsistent,
    Outdated,
    Failed,
    Diskless,
    Attaching,
}

/// The connection to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not trying to connect (disconnected by the operator, split brain, refused peer,
    /// or a resource with no peer).
    StandAlone,
    Connecting,
    Connected,
}

/// What flows over a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationState {
    Off,
    Established,
    SyncSource,
    SyncTarget,
    PausedSyncS,
    PausedSyncT,
    VerifyS,
    VerifyT,
}

/// Replication mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Complete once in both journals (DRBD protocol C).
    #[default]
    Sync,
    /// Complete once in the local journal and received by the peer (protocol B).
    SemiSync,
    /// Complete once in the local journal (protocol A).
    Async,
}

macro_rules! names {
    ($type:ty { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $type {
            /// Every value, in declaration order.
            pub const ALL: &'static [$type] = &[$(<$type>::$variant),*];

            pub fn name(self) -> &'static str {
                match self { $(<$type>::$variant => $name),* }
            }
            pub fn parse(text: &str) -> Option<$type> {
                match text { $($name => Some(<$type>::$variant),)* _ => None }
            }
        }
        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

names!(Role { Primary => "Primary", Secondary => "Secondary" });
names!(DiskState {
    UpToDate => "UpToDate",
    Inconsistent => "Inconsistent",
    Outdated => "Outdated",
    Failed => "Failed",
    Diskless => "Diskless",
    Attaching => "Attaching",
});
names!(ConnectionState { StandAlone => "StandAlone", Connecting => "Connecting", Connected => "Connected" });
names!(ReplicationState {
    Off => "Off",
    Established => "Established",
    SyncSource => "SyncSource",
    SyncTarget => "SyncTarget",
    PausedSyncS => "PausedSyncS",
    PausedSyncT => "PausedSyncT",
    VerifyS => "VerifyS",
    VerifyT => "VerifyT",
});
names!(Mode { Sync => "sync", SemiSync => "semi-sync", Async => "async" });

/// What the local node knows when asked to promote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromoteFacts {
    pub role: Role,
    pub disk: DiskState,
    /// The resource has no peer in its config.
    pub single_node: bool,
    pub connection: ConnectionState,
    /// The peer's role, when connected.
    pub peer_role: Option<Role>,
    /// A witness confirmed the peer is gone (quorum of two out of three).
    pub witness_says_peer_gone: bool,
    pub force: bool,
}

/// Why a promotion is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromoteRefusal {
    #[error("the peer is Primary: demote it first (never two primaries)")]
    PeerIsPrimary,
    #[error("local disk is {0}: promoting would serve data that may be stale or incomplete; use --force if you are sure")]
    DiskNotUpToDate(DiskState),
    #[error("local disk is {0}: there is no data to serve")]
    NoDisk(DiskState),
    #[error(
        "the peer is not connected and might still be Primary; if you know it is gone, use --force"
    )]
    PeerUnreachable,
}

/// What a promotion does, once allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromoteAction {
    /// Already Primary: nothing to do.
    AlreadyPrimary,
    /// Become Primary. `new_generation_detached`: start a new generation that tracks
    /// changes for a later resync (peer away); otherwise the connected peer follows.
    Promote { detached: bool, forced_disk: bool },
}

/// The role rules of promotion (P4: never two primaries).
pub fn decide_promote(facts: &PromoteFacts) -> Result<PromoteAction, PromoteRefusal> {
    if facts.role == Role::Primary {
        return Ok(PromoteAction::AlreadyPrimary);
    }
    match facts.disk {
        DiskState::Diskless | DiskState::Failed | DiskState::Attaching => {
            return Err(PromoteRefusal::NoDisk(facts.disk))
        }
        _ => {}
    }
    let connected = facts.connection == ConnectionState::Connected;
    if connected && facts.peer_role == Some(Role::Primary) {
        // Even --force cannot make two primaries while both see each other.
        return Err(PromoteRefusal::PeerIsPrimary);
    }
    let disk_ok = facts.disk == DiskState::UpToDate;
    // A single-node resource has nothing to sync from: its disk is the truth.
    if !disk_ok && !facts.force && !facts.single_node {
        return Err(PromoteRefusal::DiskNotUpToDate(facts.disk));
    }
    if !connected && !facts.single_node && !facts.force && !facts.witness_says_peer_gone {
        return Err(PromoteRefusal::PeerUnreachable);
    }
    Ok(PromoteAction::Promote {
        detached: !connected,
        forced_disk: !disk_ok,
    })
}

/// Which acknowledgements a client write waits for, per mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckNeeds {
    /// The peer received the record.
    pub peer_received: bool,
    /// The peer has the record in its journal (durable there too with FUA).
    pub peer_written: bool,
}

/// The ack rules: what a write in `mode` waits for while the peer is attached.
/// FUA (and FLUSH) are durable on both nodes in sync and semi-sync.
pub fn ack_needs(mode: Mode, fua: bool) -> AckNeeds {
    match mode {
        Mode::Sync => AckNeeds {
            peer_received: true,
            peer_written: true,
        },
        Mode::SemiSync => AckNeeds {
            peer_received: true,
            peer_written: fua,
        },
        Mode::Async => AckNeeds {
            peer_received: false,
            peer_written: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> PromoteFacts {
        PromoteFacts {
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            single_node: false,
            connection: ConnectionState::Connected,
            peer_role: Some(Role::Secondary),
            witness_says_peer_gone: false,
            force: false,
        }
    }

    #[test]
    fn promote_rules() {
        assert_eq!(
            decide_promote(&facts()),
            Ok(PromoteAction::Promote {
                detached: false,
                forced_disk: false
            })
        );
        let cases: Vec<(PromoteFacts, Result<PromoteAction, PromoteRefusal>)> = vec![
            (
                PromoteFacts {
                    peer_role: Some(Role::Primary),
                    ..facts()
                },
                Err(PromoteRefusal::PeerIsPrimary),
            ),
            (
                PromoteFacts {
                    peer_role: Some(Role::Primary),
                    force: true,
                    ..facts()
                },
                Err(PromoteRefusal::PeerIsPrimary),
            ),
            (
                PromoteFacts {
                    disk: DiskState::Inconsistent,
                    ..facts()
                },
                Err(PromoteRefusal::DiskNotUpToDate(DiskState::Inconsistent)),
            ),
            (
                PromoteFacts {
                    disk: DiskState::Inconsistent,
                    force: true,
                    ..facts()
                },
                Ok(PromoteAction::Promote {
                    detached: false,
                    forced_disk: true,
                }),
            ),
            (
                PromoteFacts {
                    connection: ConnectionState::Connecting,
                    peer_role: None,
                    ..facts()
                },
                Err(PromoteRefusal::PeerUnreachable),
            ),
            (
                PromoteFacts {
                    connection: ConnectionState::Connecting,
                    peer_role: None,
                    force: true,
                    ..facts()
                },
                Ok(PromoteAction::Promote {
                    detached: true,
                    forced_disk: false,
                }),
            ),
            (
                PromoteFacts {
                    connection: ConnectionState::StandAlone,
                    peer_role: None,
                    witness_says_peer_gone: true,
                    ..facts()
                },
                Ok(PromoteAction::Promote {
                    detached: true,
                    forced_disk: false,
                }),
            ),
            (
                PromoteFacts {
                    single_node: true,
                    connection: ConnectionState::StandAlone,
                    peer_role: None,
                    disk: DiskState::Inconsistent,
                    ..facts()
                },
                Ok(PromoteAction::Promote {
                    detached: true,
                    forced_disk: true,
                }),
            ),
            (
                PromoteFacts {
                    disk: DiskState::Diskless,
                    force: true,
                    ..facts()
                },
                Err(PromoteRefusal::NoDisk(DiskState::Diskless)),
            ),
            (
                PromoteFacts {
                    role: Role::Primary,
                    ..facts()
                },
                Ok(PromoteAction::AlreadyPrimary),
            ),
        ];
        for (case, expected) in cases {
            assert_eq!(decide_promote(&case), expected, "{case:?}");
        }
    }

    #[test]
    fn ack_rules_per_mode() {
        assert_eq!(
            ack_needs(Mode::Sync, false),
            AckNeeds {
                peer_received: true,
                peer_written: true
            }
        );
        assert_eq!(
            ack_needs(Mode::SemiSync, false),
            AckNeeds {
                peer_received: true,
                peer_written: false
            }
        );
        assert_eq!(
            ack_needs(Mode::SemiSync, true),
            AckNeeds {
                peer_received: true,
                peer_written: true
            }
        );
        assert_eq!(
            ack_needs(Mode::Async, true),
            AckNeeds {
                peer_received: false,
                peer_written: false
            }
        );
    }

    #[test]
    fn names_round_trip() {
        for state in [
            ReplicationState::Off,
            ReplicationState::PausedSyncT,
            ReplicationState::VerifyS,
        ] {
            assert_eq!(ReplicationState::parse(state.name()), Some(state));
        }
        assert_eq!(DiskState::parse("UpToDate"), Some(DiskState::UpToDate));
        assert_eq!(Mode::parse("semi-sync"), Some(Mode::SemiSync));
        assert_eq!(Role::parse("primary"), None);
    }
}
