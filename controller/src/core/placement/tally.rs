//! Counting agents for placement explanations ([`super::super::waiting`]): one look per
//! signature of the index.

use super::{AgentIndex, Warm, group_candidate};
use crate::core::scheduler::Candidate;

/// What [`AgentIndex::tally`] counted for a placement explanation.
pub(crate) struct Tally<K> {
    /// Agents that may get work.
    pub(crate) considered: usize,
    /// Of those, the agents the task fits.
    pub(crate) eligible: usize,
    /// Of those, the agents with a free slot.
    pub(crate) free: usize,
    /// Whether one of those is usable (its breaker lets work through).
    pub(crate) usable: bool,
    /// Agents that do not fit, by the first requirement they miss.
    pub(crate) missed: Vec<(K, usize)>,
}

impl AgentIndex {
    /// Counts agents for a placement explanation ([`super::waiting`]): `miss` names the
    /// first requirement a signature's agents fail (None: they fit), `usable` says whether
    /// a fitting agent with a free slot may get work. One look per signature, plus the free
    /// members of fitting ones until a usable one is found.
    pub(crate) fn tally<K: PartialEq>(
        &self,
        mut miss: impl FnMut(&Candidate<'_>) -> Option<K>,
        usable: impl Fn(&str) -> bool,
    ) -> Tally<K> {
        let warm = Warm::default();
        let mut t = Tally {
            considered: self.members.len(),
            eligible: 0,
            free: 0,
            usable: false,
            missed: Vec::new(),
        };
        for g in self.groups.values() {
            match miss(&group_candidate(g, &warm)) {
                Some(k) => match t.missed.iter_mut().find(|(m, _)| *m == k) {
                    Some((_, n)) => *n += g.members,
                    None => t.missed.push((k, g.members)),
                },
                None => {
                    t.eligible += g.members;
                    t.free += g.free.len();
                    t.usable = t.usable || g.free.iter().any(|(_, _, id)| usable(id));
                }
            }
        }
        t
    }
}
