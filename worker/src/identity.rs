//! The agent's identity on disk: its id and agent token, written with mode 0600 in the
//! data dir after registration so a restarted worker comes back as the same agent.

use std::io::Write;
use std::path::{Path, PathBuf};

use scabbard_common::{Error, Result};

/// Agent id and token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Agent id assigned by the controller.
    pub agent_id: String,
    /// Secret for the session stream.
    pub agent_token: String,
}

fn path(dir: &Path) -> PathBuf {
    dir.join("identity")
}

/// Reads the identity, if one was saved.
pub fn load(dir: &Path) -> Result<Option<Identity>> {
    let text = match std::fs::read_to_string(path(dir)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut lines = text.lines();
    match (lines.next(), lines.next()) {
        (Some(id), Some(token)) if !id.is_empty() && !token.is_empty() => Ok(Some(Identity {
            agent_id: id.to_string(),
            agent_token: token.to_string(),
        })),
        _ => Err(Error::invalid(format!(
            "{} is malformed; delete it to register again",
            path(dir).display()
        ))),
    }
}

/// Saves the identity atomically with owner-only permissions.
pub fn save(dir: &Path, id: &Identity) -> Result<()> {
    scabbard_common::private::private_dir(dir)?;
    let tmp = dir.join("identity.tmp");
    // Never a leftover `identity.tmp` reused with its mode (it could be 0644).
    let mut f = scabbard_common::private::create_temp(&tmp)?;
    writeln!(f, "{}\n{}", id.agent_id, id.agent_token)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_private_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let id = Identity {
            agent_id: "agent-1".into(),
            agent_token: "secret".into(),
        };
        // A temporary file left with a wide mode is not reused.
        std::fs::write(dir.path().join("identity.tmp"), "old").unwrap();
        std::fs::set_permissions(
            dir.path().join("identity.tmp"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        save(dir.path(), &id).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(id));
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
