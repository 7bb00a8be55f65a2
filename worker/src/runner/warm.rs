//! What this host's Dagger engine has warm: the images and cache volumes of its recent
//! container tasks, most recent first, bounded. Reported to the controller (in `Hello`, and
//! in a heartbeat when it changed) so the scheduler can prefer this worker for tasks that
//! would hit its cache.

use std::collections::VecDeque;

use scabbard_common::proto::{CacheSummary, TaskSpec, task_spec::Kind};

/// Most images and most cache volumes remembered (each).
pub(crate) const MAX_WARM: usize = 64;

/// A bounded most-recently-used summary with a version that moves on every change.
#[derive(Debug, Default)]
pub(crate) struct WarmCache {
    images: VecDeque<String>,
    volumes: VecDeque<String>,
    version: u64,
}

impl WarmCache {
    /// Records the image and cache volumes of a container task the engine ran (pulled).
    pub(crate) fn note(&mut self, spec: &TaskSpec) {
        let Some(Kind::Container(c)) = spec.kind.as_ref() else {
            return;
        };
        let mut changed = touch(&mut self.images, &c.image);
        for m in &c.caches {
            changed |= touch(&mut self.volumes, &m.volume);
        }
        if changed {
            self.version += 1;
        }
    }

    /// Moves when the summary changes.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    pub(crate) fn summary(&self) -> CacheSummary {
        CacheSummary {
            images: self.images.iter().cloned().collect(),
            cache_volumes: self.volumes.iter().cloned().collect(),
        }
    }
}

/// Puts `item` first; returns whether the order or content changed.
fn touch(list: &mut VecDeque<String>, item: &str) -> bool {
    if item.is_empty() || list.front().is_some_and(|f| f == item) {
        return false;
    }
    if let Some(i) = list.iter().position(|x| x == item) {
        list.remove(i);
    }
    list.push_front(item.to_string());
    list.truncate(MAX_WARM);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use scabbard_common::proto::{CacheMount, ContainerTask, ShellTask};

    fn container(image: &str, volumes: &[&str]) -> TaskSpec {
        TaskSpec {
            kind: Some(Kind::Container(ContainerTask {
                image: image.into(),
                caches: volumes
                    .iter()
                    .map(|v| CacheMount {
                        volume: v.to_string(),
                        path: "/c".into(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn most_recent_first_bounded_and_versioned() {
        let mut w = WarmCache::default();
        w.note(&container("a", &["v1"]));
        w.note(&container("b", &[]));
        let v = w.version();
        w.note(&container("b", &[]));
        assert_eq!(w.version(), v, "no change, same version");
        w.note(&container("a", &["v1"]));
        assert_eq!(w.summary().images, ["a", "b"]);
        assert_eq!(w.summary().cache_volumes, ["v1"]);
        for i in 0..100 {
            w.note(&container(&format!("img{i}"), &[]));
        }
        assert_eq!(w.summary().images.len(), MAX_WARM);
        assert_eq!(w.summary().images[0], "img99");
        let before = w.version();
        w.note(&TaskSpec {
            kind: Some(Kind::Shell(ShellTask::default())),
            ..Default::default()
        });
        assert_eq!(w.version(), before);
    }
}
