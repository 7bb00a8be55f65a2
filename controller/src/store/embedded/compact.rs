//! Offline compaction of the embedded store's file. redb reuses the pages that deletes
//! (retention) free, so the file stops growing, but it only shrinks when compacted, which
//! needs the database to itself: run it while the controller is stopped
//! (`scabbard store compact --data-dir DIR`).

use std::path::Path;

use scabbard_common::{Error, Result};

use super::{EmbeddedStore, open_error};

/// File sizes around a compaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Bytes of the store file before.
    pub before: u64,
    /// Bytes after.
    pub after: u64,
}

impl EmbeddedStore {
    /// Compacts the store file at `path`: replays its write-ahead log into it, then
    /// compacts it until redb can shrink it no further. Fails with `Unavailable` while a
    /// controller holds the file.
    pub async fn compact_offline(path: &Path) -> Result<Compacted> {
        let size = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .map_err(|e| Error::Unavailable(format!("reading {}: {e}", p.display())))
        };
        let before = size(path)?;
        // Opening replays (and empties) the write-ahead log; closing releases the file.
        let store = EmbeddedStore::open(path)?;
        store.close().await?;
        drop(store);
        let owned = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let mut db = redb::Database::open(&owned).map_err(|e| open_error(&owned, e))?;
            while db
                .compact()
                .map_err(|e| Error::Unavailable(format!("compacting {}: {e}", owned.display())))?
            {
            }
            Ok::<_, Error>(())
        })
        .await
        .map_err(|e| Error::internal(format!("compaction task: {e}")))??;
        Ok(Compacted {
            before,
            after: size(path)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Op, Store, Txn};

    #[tokio::test]
    async fn shrinks_the_file_after_deletes_and_keeps_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        for chunk in 0..20 {
            store
                .txn(Txn {
                    success: (0..100)
                        .map(|i| Op::put(format!("k/{chunk:03}/{i:03}"), vec![7u8; 4096]))
                        .collect(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        for chunk in 1..20 {
            store
                .txn(Txn {
                    success: (0..100)
                        .map(|i| Op::delete(format!("k/{chunk:03}/{i:03}")))
                        .collect(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        store.close().await.unwrap();
        drop(store);
        let c = EmbeddedStore::compact_offline(&path).await.unwrap();
        assert!(c.after < c.before, "{c:?}");
        let store = EmbeddedStore::open(&path).unwrap();
        assert!(store.get("k/000/099").await.unwrap().is_some());
        assert!(store.get("k/001/000").await.unwrap().is_none());
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn refuses_a_file_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        let e = EmbeddedStore::compact_offline(&path).await.unwrap_err();
        assert!(e.to_string().contains("locked"), "{e}");
        store.close().await.unwrap();
    }
}
