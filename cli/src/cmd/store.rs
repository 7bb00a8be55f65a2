//! `scabbard store compact`: offline maintenance of the embedded store file.

use anyhow::{Result, bail};
use scabbard_controller::store::EmbeddedStore;

use crate::args::StoreCommand;

pub(crate) async fn store(c: StoreCommand) -> Result<u8> {
    match c {
        StoreCommand::Compact { data_dir } => {
            let path = data_dir.join("state.redb");
            if !path.exists() {
                bail!(
                    "no embedded store at {} (is --data-dir the controller's data directory?)",
                    path.display()
                );
            }
            let c = EmbeddedStore::compact_offline(&path).await?;
            say!(
                "compacted {}: {} → {} bytes",
                path.display(),
                c.before,
                c.after
            );
        }
    }
    Ok(0)
}
