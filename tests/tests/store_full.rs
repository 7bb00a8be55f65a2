//! A full disk under the embedded store, for real: the controller runs in a private mount
//! namespace on a small tmpfs. When the store's writer fails, the controller stops serving
//! (health NOT_SERVING, then exits non-zero saying why and what to do) instead of running
//! on with a store it cannot write. Restarted on the same data dir with room again, it
//! repairs the store and every task it acknowledged is there.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scabbard_common::proto::{GetTaskRequest, SubmitTaskRequest, TaskSpec};
use scabbard_tests::*;
use tonic::Code;

const T: Duration = Duration::from_secs(30);

fn big_spec(i: usize) -> TaskSpec {
    let mut spec = shell("true");
    // Unique bytes per task, so nothing in the stack compresses them away; ~180 KB, under
    // every per-value and per-spec limit.
    for k in 0..3 {
        let filler: String = (0..60_000)
            .map(|j| char::from(b'a' + ((i * 7919 + k * 104_729 + j * 31) % 26) as u8))
            .collect();
        spec.env.insert(format!("FILLER_{k}"), filler);
    }
    spec.labels.insert("n".into(), i.to_string());
    spec
}

/// Kills the whole process group (the shell and whichever controller it runs) on drop.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill() has no memory-safety preconditions; a negative pid is the group.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(-self.0, libc::SIGKILL);
        }
    }
}

#[tokio::test]
async fn a_full_disk_stops_the_controller_and_a_restart_loses_nothing_acknowledged()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir(&data)?;
    let port = free_port();
    // First life on 6 MiB; the second on the same mount grown to 512 MiB.
    let script = r#"
set -u
mount -t tmpfs -o size=6m tmpfs "$DATA" || { echo "cannot mount a tmpfs (needs root or a user namespace)" >&2; exit 97; }
"$BIN" controller --listen "127.0.0.1:$PORT" --registration-token "$TOKEN" --data-dir "$DATA" --agent-lease-ttl 2s --heartbeat-interval 200ms --max-message-bytes 4194304
echo "first-life-exit=$?"
mount -o remount,size=512m "$DATA"
exec "$BIN" controller --listen "127.0.0.1:$PORT" --registration-token "$TOKEN" --data-dir "$DATA" --agent-lease-ttl 2s --heartbeat-interval 200ms --max-message-bytes 4194304
"#;
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
        ])
        .env("DATA", &data)
        .env("BIN", scabbard_bin())
        .env("PORT", port.to_string())
        .env("TOKEN", TOKEN)
        .env("SCABBARD_BOOTSTRAP_TOKEN", ADMIN_TOKEN)
        .env("SCABBARD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()?;
    let _group = Group(child.id() as i32);
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next_line = |timeout: Duration| {
        lines
            .recv_timeout(timeout)
            .map_err(|e| anyhow::anyhow!("no line from the controller within {timeout:?}: {e}"))
    };
    let mut proc = Proc::new(child, "controller on a small tmpfs");
    let first = next_line(Duration::from_secs(30))?;
    assert!(first.starts_with("listening on"), "{first}");
    let addr = format!("127.0.0.1:{port}");
    let mut tasks = tasks_client(&addr).await?;

    // Fill the disk through the API until the store gives up.
    let mut acked = Vec::new();
    let mut refused = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    for i in 0.. {
        assert!(Instant::now() < deadline, "the disk never filled");
        match tasks
            .submit(SubmitTaskRequest {
                spec: Some(big_spec(i)),
                idempotency_key: String::new(),
                project: String::new(),
            })
            .await
        {
            Ok(r) => acked.push(r.into_inner().task.unwrap().id),
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
    }
    let refused = refused.unwrap();
    assert!(
        matches!(refused.code(), Code::Unavailable),
        "a full disk is UNAVAILABLE: {refused:?}"
    );
    assert!(!acked.is_empty());
    // The first life ends on its own, non-zero, instead of serving on.
    let exit = next_line(T)?;
    let code: i32 = exit
        .strip_prefix("first-life-exit=")
        .unwrap_or_else(|| panic!("{exit}"))
        .parse()?;
    assert_ne!(code, 0, "the controller must exit non-zero");

    // The second life repairs the store: everything acknowledged is there.
    let second = next_line(Duration::from_secs(60))?;
    assert!(second.starts_with("listening on"), "{second}");
    let mut tasks = tasks_client(&addr).await?;
    for id in &acked {
        let t = eventually("the restarted controller serves", T, || {
            let mut tasks = tasks.clone();
            let id = id.clone();
            async move { tasks.get(GetTaskRequest { id }).await.ok() }
        })
        .await?
        .into_inner();
        assert_eq!(&t.id, id);
    }
    // And it takes new work.
    submit(&mut tasks, shell("true")).await?;
    proc.terminate(Duration::from_secs(10));
    Ok(())
}
