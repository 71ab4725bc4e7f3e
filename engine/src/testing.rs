//! Deterministic workloads shared by the torture binary and the tests that check it.

use crate::rng::SplitMix64;
use crate::BLOCK_BYTES;

/// One write of a [`Workload`]: write number `index` (1-based) puts `data` at `offset`.
#[derive(Debug, Clone)]
pub struct WorkloadWrite {
    pub index: usize,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// A reproducible stream of writes (aligned and unaligned, 1 byte to 16 blocks)
/// over a volume of `size_bytes`.
#[derive(Debug, Clone)]
pub struct Workload {
    rng: SplitMix64,
    size_bytes: u64,
    written: usize,
}

impl Workload {
    pub fn new(seed: u64, size_bytes: u64) -> Workload {
        Workload {
            rng: SplitMix64::new(seed),
            size_bytes,
            written: 0,
        }
    }

    pub fn next_write(&mut self) -> WorkloadWrite {
        let rng = &mut self.rng;
        let aligned = rng.below(4) != 0;
        let (offset, length) = random_extent(rng, self.size_bytes, 16, aligned);
        let mut data = vec![0u8; length as usize];
        rng.fill(&mut data);
        self.written += 1;
        WorkloadWrite {
            index: self.written,
            offset,
            data,
        }
    }
}

/// A random extent `(offset, length)` of a volume of `size_bytes`: `aligned`, whole
/// blocks (1 to `max_blocks`) at a block boundary; else 1 byte to `max_blocks` blocks
/// anywhere. Draws the length, then the offset.
pub fn random_extent(
    rng: &mut SplitMix64,
    size_bytes: u64,
    max_blocks: u64,
    aligned: bool,
) -> (u64, u64) {
    let length = if aligned {
        (1 + rng.below(max_blocks)) * BLOCK_BYTES
    } else {
        1 + rng.below(max_blocks * BLOCK_BYTES)
    };
    let mut offset = rng.below(size_bytes - length);
    if aligned {
        offset = offset / BLOCK_BYTES * BLOCK_BYTES;
    }
    (offset, length)
}

/// A replication state machine over a fresh store on `backend`, as the state
/// machine's tests drive it by hand: the store created zeroed with the smallest
/// journal, opened in manual mode (no engine threads), attached to a node named
/// `name` (`node_id`) of resource `r0` whose other nodes are `peers`, in `sync` mode
/// with the default timers. The node's storage completions go to the returned queue.
pub fn manual_node(
    backend: std::sync::Arc<dyn crate::backend::Backend>,
    uuid: [u8; 16],
    name: &str,
    node_id: u32,
    peers: &[(&str, u32)],
) -> (
    crate::node::Node<crate::node::storage::VolumeStorage>,
    crate::Volume,
    crate::node::storage::CompletionQueue,
) {
    use crate::node::storage::{CompletionQueue, VolumeStorage};
    use crate::node::{AttachFacts, Node, NodeConfig, PeerConfig, Time};
    use crate::volume::{Background, CreateOptions, MetaStore};
    let create = CreateOptions {
        resource_uuid: uuid,
        node_id,
        node_name: name.to_string(),
        journal_bytes: crate::layout::MIN_JOURNAL_BYTES,
        force: false,
        assume_zeroed: true,
    };
    crate::Volume::create(&backend, &MetaStore::Internal, &create, &mut |_, _| {})
        .expect("create-md on a simulated store");
    let options = crate::VolumeOptions {
        background: Background::Manual,
        ..crate::VolumeOptions::default()
    };
    let (volume, _) = crate::Volume::open(backend, MetaStore::Internal, Some(uuid), options)
        .expect("open a freshly created store");
    let queue = CompletionQueue::new(std::sync::Arc::new(|| {}));
    let storage = VolumeStorage::new(volume.clone(), queue.clone(), true);
    let config = NodeConfig {
        resource: "r0".into(),
        uuid,
        node_name: name.into(),
        node_id,
        mode: crate::repl::Mode::Sync,
        peers: peers
            .iter()
            .map(|&(name, node_id)| PeerConfig {
                name: name.into(),
                node_id,
            })
            .collect(),
        timing: Default::default(),
        resync: Default::default(),
        on_io_error: Default::default(),
        read_balancing: Default::default(),
        mutation: None,
    };
    let mut node = Node::new(config, Time::ZERO, u64::from(node_id) + 7);
    node.attach(Time::ZERO, storage, AttachFacts::default());
    (node, volume, queue)
}
