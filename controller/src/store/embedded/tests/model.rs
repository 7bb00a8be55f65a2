//! Property test: random transactions agree with a `BTreeMap` model.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::temp_store;
use crate::store::{CmpOp, Compare, CompareTarget, Op, OpResult, Store, Txn};

/// One step of the model test.
#[derive(Debug, Clone)]
enum Step {
    Put(u8, u8),
    Delete(u8),
    /// If key's version == v then put, else delete other key.
    CasVersion(u8, i64, u8, u8),
    /// If key's value < bytes then [put, get], else [get].
    CasValueLess(u8, u8, u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..6u8, any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
        (0..6u8).prop_map(Step::Delete),
        (0..6u8, 0..4i64, 0..6u8, any::<u8>())
            .prop_map(|(k, v, o, x)| Step::CasVersion(k, v, o, x)),
        (0..6u8, any::<u8>(), any::<u8>()).prop_map(|(k, b, x)| Step::CasValueLess(k, b, x)),
    ]
}

/// (value, create, mod, version)
type Model = BTreeMap<String, (Vec<u8>, i64, i64, i64)>;

fn key(k: u8) -> String {
    format!("m/{k}")
}

/// Applies ops to the model as the store should; returns (results, wrote).
fn model_ops(model: &mut Model, rev: i64, ops: &[Op]) -> (Vec<OpResult>, bool) {
    let mut wrote = false;
    let mut results = Vec::new();
    for op in ops {
        match op {
            Op::Put { key, value, .. } => {
                let e = model.get(key).cloned();
                let (create, version) = e.map_or((rev, 1), |(_, c, _, v)| (c, v + 1));
                model.insert(key.clone(), (value.clone(), create, rev, version));
                wrote = true;
                results.push(OpResult::Put);
            }
            Op::Delete { key } => {
                let existed = model.remove(key).is_some();
                wrote |= existed;
                results.push(OpResult::Delete(existed));
            }
            Op::Get { key } => results.push(OpResult::Get(model.get(key).map(|(v, c, m, ver)| {
                crate::store::KeyValue {
                    key: key.clone(),
                    value: v.clone(),
                    create_revision: *c,
                    mod_revision: *m,
                    version: *ver,
                    lease: 0,
                }
            }))),
        }
    }
    (results, wrote)
}

fn to_txn(s: &Step, model: &Model) -> (Txn, bool) {
    let get = |k: u8| Op::Get { key: key(k) };
    match s {
        Step::Put(k, v) => (
            Txn {
                success: vec![Op::put(key(*k), vec![*v])],
                ..Txn::default()
            },
            true,
        ),
        Step::Delete(k) => (
            Txn {
                success: vec![Op::delete(key(*k))],
                ..Txn::default()
            },
            true,
        ),
        Step::CasVersion(k, v, o, x) => {
            let holds = model.get(&key(*k)).map_or(0, |e| e.3) == *v;
            let t = Txn {
                compares: vec![Compare {
                    key: key(*k),
                    op: CmpOp::Equal,
                    target: CompareTarget::Version(*v),
                }],
                success: vec![Op::put(key(*k), vec![*x]), get(*k)],
                failure: vec![Op::delete(key(*o)), get(*o)],
            };
            (t, holds)
        }
        Step::CasValueLess(k, b, x) => {
            let cur = model.get(&key(*k)).map_or(Vec::new(), |e| e.0.clone());
            let holds = cur < vec![*b];
            let t = Txn {
                compares: vec![Compare {
                    key: key(*k),
                    op: CmpOp::Less,
                    target: CompareTarget::Value(vec![*b]),
                }],
                success: vec![Op::put(key(*k), vec![*x]), get(*k)],
                failure: vec![get(*k)],
            };
            (t, holds)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn store_agrees_with_a_btreemap_model(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (_dir, store) = temp_store();
            let mut model = Model::new();
            let mut rev = store.revision().await.unwrap();
            for s in &steps {
                let (txn, holds) = to_txn(s, &model);
                let ops = if holds { txn.success.clone() } else { txn.failure.clone() };
                let (results, wrote) = model_ops(&mut model, rev + 1, &ops);
                if wrote {
                    rev += 1;
                }
                let r = store.txn(txn).await.unwrap();
                assert_eq!(r.succeeded, holds, "{s:?}");
                assert_eq!(r.revision, rev, "{s:?}");
                assert_eq!(r.results, results, "{s:?}");
            }
            let page = store.range("m/", None, 0).await.unwrap();
            let got: Model = page
                .kvs
                .into_iter()
                .map(|kv| (kv.key, (kv.value, kv.create_revision, kv.mod_revision, kv.version)))
                .collect();
            assert_eq!(got, model);
            assert_eq!(page.revision, rev);
            store.close().await.unwrap();
        });
    }
}
