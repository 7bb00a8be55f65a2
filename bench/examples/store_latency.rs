//! Sequential commit latency of the embedded store (one put per transaction).
use std::time::Instant;

use scabbard_controller::store::{EmbeddedStore, Store};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = EmbeddedStore::open(&dir.path().join("s.redb"))?;
    let n = 200;
    let t0 = Instant::now();
    for i in 0..n {
        store.put(&format!("k/{i}"), vec![0u8; 300]).await?;
    }
    let el = t0.elapsed();
    println!(
        "sequential: {n} commits in {el:?} = {:.2} ms/commit",
        el.as_secs_f64() * 1e3 / n as f64
    );
    Ok(())
}
