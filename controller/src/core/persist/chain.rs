//! The commit chain: what keeps commits in order when several are in flight at once.
//!
//! With a store that takes several transactions at once (etcd: concurrent proposals share
//! one raft round and one fsync), the persister sends a full batch before the one ahead of
//! it is answered. The store may then apply them in any order, so every chained
//! transaction compares [`CHAIN_KEY`] with the value its predecessor puts and puts its own
//! (unique to this persister and batch). A transaction is applied only right after its
//! predecessor: if that one failed, or arrived later, the compare fails and the persister
//! sends it again once everything before it is settled. Its failure branch reads the fence
//! and the chain key back, which tells the three reasons apart: the fence is gone (the
//! term is over), the chain already holds this transaction's own value (an earlier try
//! was applied and its answer lost), or it was out of turn (send again).

use scabbard_common::Result;

use crate::store::{CmpOp, Compare, CompareTarget, KeyValue, Op, OpResult, Txn, TxnResponse};

/// The key every chained commit compares and puts (never read by anything else).
pub(crate) const CHAIN_KEY: &str = "meta/commit-chain";

/// The links handed out by one persister (one term).
pub(super) struct Chain {
    /// Unique to this persister: no other term ever puts the same value.
    id: String,
    /// Links handed out so far.
    issued: u64,
    /// The value of the last chained commit known applied (`None`: none yet this term).
    applied: Option<Vec<u8>>,
}

/// One transaction's place in the chain.
#[derive(Debug, Clone)]
pub(super) struct Link {
    /// The value the predecessor put (`None`: not compared; only when nothing of this
    /// term is in flight or known applied before it).
    pub(super) prev: Option<Vec<u8>>,
    /// The value this transaction puts.
    pub(super) next: Vec<u8>,
}

/// What a chained transaction's answer means.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Applied (now, or by an earlier try whose answer was lost).
    Applied,
    /// The leader's fence no longer holds.
    FenceLost,
    /// Not applied: its predecessor was not (yet) applied when it was evaluated.
    OutOfTurn,
}

impl Chain {
    pub(super) fn new() -> Self {
        Self {
            id: ulid::Ulid::new().to_string(),
            issued: 0,
            applied: None,
        }
    }

    /// A link after `prev` (the last one in flight), or after the last applied one.
    pub(super) fn link(&mut self, prev: Option<&Link>) -> Link {
        self.issued += 1;
        Link {
            prev: prev.map_or_else(|| self.applied.clone(), |p| Some(p.next.clone())),
            next: format!("{}:{}", self.id, self.issued).into_bytes(),
        }
    }

    /// `link` again, after everything before it settled: it follows what is applied now.
    pub(super) fn relink(&self, link: &Link) -> Link {
        Link {
            prev: self.applied.clone(),
            next: link.next.clone(),
        }
    }

    /// `link`'s transaction was applied.
    pub(super) fn applied(&mut self, link: &Link) {
        self.applied = Some(link.next.clone());
    }
}

/// The transaction of `ops` under the fence, chained by `link` if given.
pub(super) fn txn(fence: Option<&Compare>, ops: Vec<Op>, link: Option<&Link>) -> Txn {
    let mut compares: Vec<Compare> = fence.into_iter().cloned().collect();
    let Some(link) = link else {
        return Txn {
            compares,
            success: ops,
            failure: Vec::new(),
        };
    };
    if let Some(prev) = &link.prev {
        compares.push(Compare {
            key: CHAIN_KEY.into(),
            op: CmpOp::Equal,
            target: CompareTarget::Value(prev.clone()),
        });
    }
    let mut success = ops;
    success.push(Op::put(CHAIN_KEY, link.next.clone()));
    let mut failure: Vec<Op> = fence
        .map(|f| Op::Get { key: f.key.clone() })
        .into_iter()
        .collect();
    failure.push(Op::Get {
        key: CHAIN_KEY.into(),
    });
    Txn {
        compares,
        success,
        failure,
    }
}

/// What the answer to [`txn`]`(fence, _, link)` means (`link` given).
pub(super) fn verdict(
    fence: Option<&Compare>,
    link: &Link,
    answer: &TxnResponse,
) -> Result<Verdict> {
    if answer.succeeded {
        return Ok(Verdict::Applied);
    }
    let mut reads = answer.results.iter().map(|r| match r {
        OpResult::Get(kv) => Ok(kv.as_ref()),
        other => Err(scabbard_common::Error::internal(format!(
            "a chained commit's failure branch answered {other:?}, not a read"
        ))),
    });
    let missing = || {
        scabbard_common::Error::internal("a chained commit's failure branch answered too few reads")
    };
    if let Some(f) = fence {
        let got = reads.next().ok_or_else(missing)??;
        if !holds(f, got) {
            return Ok(Verdict::FenceLost);
        }
    }
    let chain = reads.next().ok_or_else(missing)??;
    if chain.is_some_and(|kv| kv.value == link.next) {
        return Ok(Verdict::Applied);
    }
    Ok(Verdict::OutOfTurn)
}

/// Whether `compare` holds for `kv` (the key's current state, `None` when absent).
fn holds(compare: &Compare, kv: Option<&KeyValue>) -> bool {
    use std::cmp::Ordering;
    let ord = match &compare.target {
        CompareTarget::Version(v) => kv.map_or(0, |kv| kv.version).cmp(v),
        CompareTarget::CreateRevision(r) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
        CompareTarget::ModRevision(r) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
        CompareTarget::Value(v) => match kv {
            Some(kv) => kv.value.as_slice().cmp(v.as_slice()),
            // etcd: a value compare on an absent key fails whatever the operator.
            None => return false,
        },
    };
    match compare.op {
        CmpOp::Equal => ord == Ordering::Equal,
        CmpOp::NotEqual => ord != Ordering::Equal,
        CmpOp::Less => ord == Ordering::Less,
        CmpOp::Greater => ord == Ordering::Greater,
    }
}
