//! Read balancing: which replica serves a Primary's client read (DRBD's
//! `read-balancing`). Pure: the policy, the load it looks at, and the choice.
//!
//! The *rule* that decides whether a peer may serve a read at all (UpToDate, the
//! blocks neither out of sync nor in flight to it) lives in the state machine
//! (`Node::balance_read`); this module only chooses among the replicas the rule
//! left, the local store always among them. Every choice is deterministic given
//! its inputs (a decision counter replaces randomness), so the simulator and the
//! unit tests replay it exactly.

use std::time::Duration;

/// Smallest and largest stripe of `striping-<size>` (DRBD's 32K … 1M).
pub const STRIPE_BYTES_MIN: u64 = 32 * 1024;
pub const STRIPE_BYTES_MAX: u64 = 1024 * 1024;

/// `adaptive` sends one decision in this many to a replica chosen in turn, so the
/// latency of a replica it does not prefer is measured again now and then (a replica
/// that was slow once would otherwise never be tried again).
pub const ADAPTIVE_PROBE_EVERY: u64 = 64;

/// `adaptive` prefers a peer only when the local store's expected wait is this many
/// times the peer's: a remote read costs the CPU of two daemons and a round trip, so
/// a tie is the local store's.
pub const ADAPTIVE_LOCAL_BIAS: u64 = 2;

/// Which replica serves a Primary's reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadBalancing {
    /// Every read from the local store (the default).
    #[default]
    PreferLocal,
    /// Reads from a peer whenever the rule allows (the least loaded one).
    PreferRemote,
    /// The local store and the allowed peers in turn.
    RoundRobin,
    /// The replica with the fewest reads outstanding (ties: the local store).
    LeastPending,
    /// The volume cut into stripes of `stripe_bytes`, dealt to the replicas in turn
    /// by the stripe of a read's first byte.
    Striping { stripe_bytes: u64 },
    /// Per request, the replica with the least expected wait: a moving average of
    /// its latency weighted by the reads it has outstanding.
    Adaptive,
}

impl ReadBalancing {
    pub fn name(self) -> String {
        match self {
            ReadBalancing::PreferLocal => "prefer-local".into(),
            ReadBalancing::PreferRemote => "prefer-remote".into(),
            ReadBalancing::RoundRobin => "round-robin".into(),
            ReadBalancing::LeastPending => "least-pending".into(),
            ReadBalancing::Striping { stripe_bytes } => {
                format!("striping-{}K", stripe_bytes / 1024)
            }
            ReadBalancing::Adaptive => "adaptive".into(),
        }
    }

    /// Parses a policy name; the error says what is accepted.
    pub fn parse(name: &str) -> Result<ReadBalancing, String> {
        let fixed = [
            ReadBalancing::PreferLocal,
            ReadBalancing::PreferRemote,
            ReadBalancing::RoundRobin,
            ReadBalancing::LeastPending,
            ReadBalancing::Adaptive,
        ];
        if let Some(policy) = fixed.into_iter().find(|policy| policy.name() == name) {
            return Ok(policy);
        }
        let expected = "prefer-local, prefer-remote, round-robin, least-pending, adaptive or \
                        striping-<size> with a power of two from 32K to 1M";
        let Some(size) = name.strip_prefix("striping-") else {
            return Err(format!(
                "{name:?} is not a read-balancing policy ({expected})"
            ));
        };
        let stripe_bytes = parse_stripe(size)
            .ok_or_else(|| format!("{name:?} is not a read-balancing policy ({expected})"))?;
        Ok(ReadBalancing::Striping { stripe_bytes })
    }
}

/// `32K`, `64k`, `1M`, or a byte count: a power of two within the stripe bounds.
fn parse_stripe(text: &str) -> Option<u64> {
    let (digits, unit) = match text.char_indices().last()? {
        (at, 'k' | 'K') => (&text[..at], 1024),
        (at, 'm' | 'M') => (&text[..at], 1024 * 1024),
        _ => (text, 1),
    };
    let bytes = digits.parse::<u64>().ok()?.checked_mul(unit)?;
    (bytes.is_power_of_two() && (STRIPE_BYTES_MIN..=STRIPE_BYTES_MAX).contains(&bytes))
        .then_some(bytes)
}

/// What the balancer knows of one replica: reads outstanding and a moving average of
/// how long its reads took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaLoad {
    pub pending: u64,
    /// Exponential moving average (weight 1/8) of read latency; 0: never measured.
    pub latency_ns: u64,
}

impl ReplicaLoad {
    pub fn started(&mut self) {
        self.pending += 1;
    }

    /// A read that [`ReplicaLoad::started`] ended (answered, failed or given up).
    pub fn ended(&mut self) {
        self.pending = self.pending.saturating_sub(1);
    }

    /// One latency sample.
    pub fn measured(&mut self, latency: Duration) {
        let sample = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.latency_ns = if self.latency_ns == 0 {
            sample
        } else {
            self.latency_ns - self.latency_ns / 8 + sample / 8
        };
    }

    /// The wait a new read should expect here: its latency times the reads ahead of
    /// it and itself (unmeasured counts as no wait, so it gets measured).
    fn expected_wait(&self) -> u128 {
        u128::from(self.latency_ns) * u128::from(self.pending + 1)
    }
}

/// Chooses the replica of one read: `None` is the local store, `Some(i)` is
/// `peers[i]` (the peers the rule allows for this read, in peer order). `offset` is
/// the read's first byte; `decision` counts the decisions made so far (turns and
/// probes follow it).
pub fn choose(
    policy: ReadBalancing,
    local: &ReplicaLoad,
    peers: &[ReplicaLoad],
    offset: u64,
    decision: u64,
) -> Option<usize> {
    if peers.is_empty() {
        return None;
    }
    let replicas = peers.len() as u64 + 1;
    // Replica `n` of the turn order: 0 is the local store.
    let turn = |n: u64| (n % replicas).checked_sub(1).map(|peer| peer as usize);
    let least_pending_peer = || {
        (0..peers.len())
            .min_by_key(|&index| peers[index].pending)
            .unwrap_or(0)
    };
    match policy {
        ReadBalancing::PreferLocal => None,
        ReadBalancing::PreferRemote => Some(least_pending_peer()),
        ReadBalancing::RoundRobin => turn(decision),
        ReadBalancing::LeastPending => {
            let peer = least_pending_peer();
            (peers[peer].pending < local.pending).then_some(peer)
        }
        ReadBalancing::Striping { stripe_bytes } => turn(offset / stripe_bytes.max(1)),
        ReadBalancing::Adaptive => {
            if decision % ADAPTIVE_PROBE_EVERY == ADAPTIVE_PROBE_EVERY - 1 {
                return turn(decision / ADAPTIVE_PROBE_EVERY);
            }
            let peer = (0..peers.len())
                .min_by_key(|&index| peers[index].expected_wait())
                .unwrap_or(0);
            let local_wait = local.expected_wait();
            let peer_wait = peers[peer].expected_wait();
            (local_wait > peer_wait.saturating_mul(u128::from(ADAPTIVE_LOCAL_BIAS))).then_some(peer)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pending: u64, latency_us: u64) -> ReplicaLoad {
        ReplicaLoad {
            pending,
            latency_ns: latency_us * 1000,
        }
    }

    #[test]
    fn policies_parse_and_print_back() {
        for name in [
            "prefer-local",
            "prefer-remote",
            "round-robin",
            "least-pending",
            "adaptive",
            "striping-32K",
            "striping-1024K",
        ] {
            let policy = ReadBalancing::parse(name).unwrap();
            assert_eq!(policy.name(), name);
        }
        assert_eq!(
            ReadBalancing::parse("striping-1M"),
            Ok(ReadBalancing::Striping {
                stripe_bytes: 1 << 20
            })
        );
        assert_eq!(
            ReadBalancing::parse("striping-65536"),
            Ok(ReadBalancing::Striping {
                stripe_bytes: 65536
            })
        );
        for bad in [
            "",
            "fastest",
            "striping-",
            "striping-16K",
            "striping-2M",
            "striping-48K",
            "striping-x",
            "striping-99999999999999999999K",
        ] {
            let error = ReadBalancing::parse(bad).unwrap_err();
            assert!(error.contains("prefer-local"), "{bad}: {error}");
        }
    }

    #[test]
    fn without_an_allowed_peer_every_policy_reads_locally() {
        for policy in [
            ReadBalancing::PreferRemote,
            ReadBalancing::RoundRobin,
            ReadBalancing::LeastPending,
            ReadBalancing::Striping {
                stripe_bytes: 32768,
            },
            ReadBalancing::Adaptive,
        ] {
            for decision in 0..10 {
                assert_eq!(choose(policy, &load(9, 900), &[], 0, decision), None);
            }
        }
    }

    #[test]
    fn fixed_policies_choose_as_named() {
        let idle = ReplicaLoad::default();
        let peers = [load(3, 10), load(1, 10)];
        assert_eq!(
            choose(ReadBalancing::PreferLocal, &idle, &peers, 0, 0),
            None
        );
        assert_eq!(
            choose(ReadBalancing::PreferRemote, &idle, &peers, 0, 0),
            Some(1)
        );
        let turns: Vec<_> = (0..6)
            .map(|d| choose(ReadBalancing::RoundRobin, &idle, &peers, 0, d))
            .collect();
        assert_eq!(turns, [None, Some(0), Some(1), None, Some(0), Some(1)]);
        // Least pending: ties go to the local store.
        assert_eq!(
            choose(ReadBalancing::LeastPending, &load(1, 0), &peers, 0, 0),
            None
        );
        assert_eq!(
            choose(ReadBalancing::LeastPending, &load(2, 0), &peers, 0, 0),
            Some(1)
        );
        let stripes = ReadBalancing::Striping {
            stripe_bytes: 32768,
        };
        let one_peer = [load(0, 0)];
        assert_eq!(choose(stripes, &idle, &one_peer, 0, 7), None);
        assert_eq!(choose(stripes, &idle, &one_peer, 32767, 7), None);
        assert_eq!(choose(stripes, &idle, &one_peer, 32768, 7), Some(0));
        assert_eq!(choose(stripes, &idle, &one_peer, 65536, 7), None);
    }

    #[test]
    fn adaptive_weighs_latency_by_queue_depth_and_favours_the_local_store() {
        let adaptive = ReadBalancing::Adaptive;
        // Equal stores: the local store's wait must be more than twice the peer's.
        assert_eq!(choose(adaptive, &load(4, 100), &[load(2, 100)], 0, 0), None);
        assert_eq!(
            choose(adaptive, &load(6, 100), &[load(2, 100)], 0, 0),
            Some(0)
        );
        // A slow local store loses even with an empty queue.
        assert_eq!(
            choose(adaptive, &load(0, 5000), &[load(8, 200)], 0, 0),
            Some(0)
        );
        // The better of two peers.
        assert_eq!(
            choose(
                adaptive,
                &load(8, 1000),
                &[load(4, 500), load(1, 500)],
                0,
                1
            ),
            Some(1)
        );
        // An unmeasured peer gets measured.
        assert_eq!(
            choose(adaptive, &load(1, 100), &[ReplicaLoad::default()], 0, 0),
            Some(0)
        );
        // Probes: one decision in ADAPTIVE_PROBE_EVERY goes to a replica in turn, even
        // to a peer far slower than the local store.
        let probe = ADAPTIVE_PROBE_EVERY - 1;
        let slow_peer = [load(0, 1_000_000)];
        assert_eq!(choose(adaptive, &load(0, 10), &slow_peer, 0, probe), None);
        assert_eq!(
            choose(
                adaptive,
                &load(0, 10),
                &slow_peer,
                0,
                probe + ADAPTIVE_PROBE_EVERY
            ),
            Some(0)
        );
        assert_eq!(
            choose(adaptive, &load(0, 10), &slow_peer, 0, probe + 1),
            None
        );
    }

    #[test]
    fn load_averages_latency_and_counts_pending() {
        let mut replica = ReplicaLoad::default();
        replica.started();
        replica.started();
        replica.ended();
        assert_eq!(replica.pending, 1);
        replica.ended();
        replica.ended();
        assert_eq!(replica.pending, 0, "never below zero");
        replica.measured(Duration::from_micros(800));
        assert_eq!(
            replica.latency_ns, 800_000,
            "the first sample is the average"
        );
        replica.measured(Duration::from_micros(0));
        assert_eq!(replica.latency_ns, 700_000, "seven eighths of the average");
        replica.measured(Duration::MAX);
        assert!(replica.latency_ns > 700_000);
    }
}
