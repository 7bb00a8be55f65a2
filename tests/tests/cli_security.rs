//! The security commands through the real `scabbard` binary against a real controller
//! process: `login` (a private credentials file later commands use), `token
//! create|list|revoke` (scopes and revocation enforced on the next call), `project` and
//! `submit --project`, and `audit`. Every invocation uses a private config dir
//! (`SCABBARD_CONFIG_DIR`), never the real home.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use scabbard_tests::*;

struct Env {
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    ctl: Controller,
}

impl Env {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ctl = Controller::start(
            &dir.path().join("controller"),
            free_port(),
            &ControllerOpts::default(),
        )?;
        let env = Self {
            config: dir.path().join("cli-config"),
            _dir: dir,
            ctl,
        };
        // Until the controller answers authenticated calls.
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let out = env.admin(&["whoami"]).output()?;
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < end,
                "controller never answered: {}",
                text(&out)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(env)
    }

    fn addr(&self) -> String {
        self.ctl.addr.to_string()
    }

    /// `scabbard <args>` for this controller with the admin token in the environment.
    fn admin(&self, args: &[&str]) -> Command {
        let mut c = cli(&self.config);
        c.env("SCABBARD_CONTROLLER", self.addr()).args(args);
        c
    }

    /// `scabbard <args>` for this controller with no token but the credentials file (or
    /// what `args` give).
    fn bare(&self, args: &[&str]) -> Command {
        let mut c = self.admin(args);
        c.env_remove("SCABBARD_TOKEN");
        c
    }

    /// `scabbard <args>` for this controller with `token` (`--token` goes before any `--`).
    fn with(&self, token: &str, args: &[&str]) -> Command {
        let (flags, command) = match args.iter().position(|a| *a == "--") {
            Some(i) => args.split_at(i),
            None => (args, &[][..]),
        };
        let mut c = self.bare(flags);
        c.args(["--token", token]).args(command);
        c
    }

    /// A new API token; returns (id, secret).
    fn token(&self, name: &str, scope: &str, project: &str) -> anyhow::Result<(String, String)> {
        let out = ok(self.admin(&[
            "token",
            "create",
            "--name",
            name,
            "--scope",
            scope,
            "--project",
            project,
        ]))?;
        let secret = stdout(&out).trim().to_string();
        let err = stderr(&out);
        assert!(secret.starts_with("scbd_api_"), "secret: {secret:?}");
        assert!(err.contains("only this once"), "{err}");
        let id = err
            .split_whitespace()
            .find(|w| w.starts_with("tok_"))
            .unwrap_or_else(|| panic!("no token id in {err}"))
            .to_string();
        Ok((id, secret))
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    )
}

/// Runs `c`, which must succeed.
fn ok(mut c: Command) -> anyhow::Result<Output> {
    let out = c.output()?;
    assert!(out.status.success(), "{c:?} failed: {}", text(&out));
    Ok(out)
}

/// Runs `c`, which must fail with `code` (e.g. `UNAUTHENTICATED`) on stderr.
fn fails(mut c: Command, code: &str) -> anyhow::Result<Output> {
    let out = c.output()?;
    assert!(!out.status.success(), "{c:?} succeeded: {}", text(&out));
    assert!(
        stderr(&out).contains(code),
        "{c:?}: expected {code}: {}",
        text(&out)
    );
    assert!(!stderr(&out).contains("panicked"), "{}", text(&out));
    Ok(out)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn login_saves_a_private_token_that_later_commands_use() -> anyhow::Result<()> {
    let env = Env::start()?;
    let creds = env.config.join("credentials.toml");

    // Without a token anywhere: a clear error, no call made.
    // (It suggests the login prompt or SCABBARD_TOKEN, never a token on the command line.)
    let out = fails(env.bare(&["task", "list"]), "scabbard login")?;
    assert!(stderr(&out).contains("SCABBARD_TOKEN"), "{}", text(&out));
    assert_eq!(out.status.code(), Some(77), "{}", text(&out));

    let (id, secret) = env.token("laptop", "submit", "default")?;
    // The token on stdin (not on the command line); checked before it is saved.
    let mut child = env
        .bare(&["login"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{secret}")?;
    }
    let out = child.wait_with_output()?;
    assert!(out.status.success(), "login: {}", text(&out));
    assert!(stdout(&out).contains("laptop"), "{}", text(&out));
    assert!(stdout(&out).contains(&id), "{}", text(&out));
    assert_eq!(mode(&creds), 0o600);
    assert_eq!(mode(&env.config), 0o700);
    let saved = std::fs::read_to_string(&creds)?;
    assert!(saved.contains(&secret) && saved.contains(&env.addr()));
    assert!(!stdout(&out).contains(&secret) && !stderr(&out).contains(&secret));

    // Later commands need no token (nor, for the current entry, an address).
    let out = ok(env.bare(&["whoami"]))?;
    assert!(stdout(&out).contains(&id), "{}", text(&out));
    assert!(stdout(&out).contains("credentials.toml"), "{}", text(&out));
    let mut c = cli(&env.config);
    c.env_remove("SCABBARD_TOKEN")
        .env_remove("SCABBARD_CONTROLLER")
        .args(["submit", "--noop"]);
    let out = ok(c)?;
    let task = stdout(&out).trim().to_string();
    let out = ok(env.bare(&["task", "get", &task]))?;
    assert!(
        stdout(&out).contains("project:   default"),
        "{}",
        text(&out)
    );
    ok(env.bare(&["task", "list"]))?;

    // A bad token is refused before it is saved.
    fails(
        env.bare(&["login", "--token", "scbd_api_not-a-real-token-0000000000"]),
        "UNAUTHENTICATED",
    )?;
    assert!(std::fs::read_to_string(&creds)?.contains(&secret));

    // A credentials file others can read is refused.
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644))?;
    fails(env.bare(&["task", "list"]), "chmod 600")?;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600))?;

    // Logout forgets it (and says the token stays valid).
    let out = ok(env.bare(&["logout"]))?;
    assert!(stdout(&out).contains(&id), "{}", text(&out));
    fails(env.bare(&["task", "list"]), "scabbard login")?;
    assert!(!std::fs::read_to_string(&creds)?.contains(&secret));
    assert_eq!(mode(&creds), 0o600);
    Ok(())
}

#[test]
fn tokens_round_trip_and_their_scopes_and_revocation_hold() -> anyhow::Result<()> {
    let env = Env::start()?;
    let (reader_id, reader) = env.token("ci-reader", "read", "default")?;
    let (submitter_id, submitter) = env.token("ci-submitter", "read,submit", "default")?;

    let out = ok(env.admin(&["token", "list"]))?;
    let list = stdout(&out);
    assert!(list.starts_with("ID"), "{list}");
    for (id, name) in [(&reader_id, "ci-reader"), (&submitter_id, "ci-submitter")] {
        let line = list
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id} not listed: {list}"));
        assert!(line.contains(name) && line.contains("active"), "{line}");
    }
    assert!(!list.contains(&reader) && !list.contains(&submitter));

    // A read-only token reads but cannot submit.
    ok(env.with(&reader, &["task", "list"]))?;
    fails(
        env.with(&reader, &["submit", "--noop"]),
        "PERMISSION_DENIED",
    )?;
    ok(env.with(&submitter, &["submit", "--noop"]))?;

    // A registration token: no scopes, limited uses.
    let out = ok(env.admin(&[
        "token",
        "create",
        "--kind",
        "registration",
        "--uses",
        "2",
        "--ttl",
        "1h",
    ]))?;
    assert!(
        stdout(&out).trim().starts_with("scbd_reg_"),
        "{}",
        text(&out)
    );
    let out = ok(env.admin(&["token", "list", "--kind", "registration"]))?;
    assert!(stdout(&out).contains("0/2"), "{}", text(&out));
    assert!(!stdout(&out).contains(&reader_id), "{}", text(&out));

    // Revoked: the very next call with it is refused.
    let out = ok(env.admin(&["token", "revoke", &submitter_id, "--reason", "rotated"]))?;
    assert!(stdout(&out).contains(&submitter_id), "{}", text(&out));
    fails(env.with(&submitter, &["task", "list"]), "UNAUTHENTICATED")?;
    fails(
        env.with(&submitter, &["submit", "--noop"]),
        "UNAUTHENTICATED",
    )?;
    // Listed as revoked only with --all.
    let out = ok(env.admin(&["token", "list"]))?;
    assert!(!stdout(&out).contains(&submitter_id), "{}", text(&out));
    let out = ok(env.admin(&["token", "list", "--all"]))?;
    let line = stdout(&out)
        .lines()
        .find(|l| l.starts_with(submitter_id.as_str()))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(line.contains("revoked"), "{}", text(&out));

    // Bad input is caught before any call.
    fails(env.admin(&["token", "create", "--name", "x"]), "--scope")?;
    fails(
        env.admin(&["token", "create", "--scope", "read", "--ttl", "5x"]),
        "duration",
    )?;
    Ok(())
}

#[test]
fn projects_fence_submissions_and_the_audit_log_names_the_actor() -> anyhow::Result<()> {
    let env = Env::start()?;
    let worker_dir = env.config.parent().unwrap().join("w0");
    let _w = Worker::start(&env.addr(), &worker_dir, "w0", 2)?;

    ok(env.admin(&[
        "project",
        "create",
        "payments",
        "--description",
        "payment service CI",
        "--max-queued",
        "50",
        "--rate",
        "20",
    ]))?;
    let out = ok(env.admin(&["project", "list"]))?;
    let line = stdout(&out)
        .lines()
        .find(|l| l.starts_with("payments"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("payments not listed: {}", text(&out)));
    assert!(line.contains("50") && line.contains("20"), "{line}");
    assert!(stdout(&out).contains("default"), "{}", text(&out));
    // Update keeps what it is not given.
    let out = ok(env.admin(&["project", "update", "payments", "--max-running", "3"]))?;
    let shown = stdout(&out);
    assert!(shown.contains("max queued:   50"), "{shown}");
    assert!(shown.contains("max running:  3"), "{shown}");
    assert!(shown.contains("payment service CI"), "{shown}");
    fails(
        env.admin(&["project", "create", "payments"]),
        "ALREADY_EXISTS",
    )?;

    // Submitted into the project, explicitly, and implicitly with a project-bound token.
    let out = ok(env.with(
        ADMIN_TOKEN,
        &["submit", "--project", "payments", "--wait", "--", "true"],
    ))?;
    assert!(stderr(&out).contains("SUCCEEDED"), "{}", text(&out));
    let (_, bound) = env.token("payments-ci", "submit", "payments")?;
    let out = ok(env.with(&bound, &["submit", "--name", "bound-task", "--noop"]))?;
    let bound_task = stdout(&out).trim().to_string();
    let out = ok(env.admin(&["task", "get", &bound_task]))?;
    assert!(
        stdout(&out).contains("project:   payments"),
        "{}",
        text(&out)
    );
    let out = ok(env.admin(&["task", "list", "--project", "payments"]))?;
    assert_eq!(stdout(&out).lines().count(), 3, "{}", text(&out));
    let out = ok(env.admin(&["task", "list", "--project", "default"]))?;
    assert_eq!(stdout(&out).lines().count(), 1, "{}", text(&out));
    // The bound token cannot reach another project.
    fails(
        env.with(&bound, &["submit", "--project", "default", "--noop"]),
        "PERMISSION_DENIED",
    )?;

    // Token create and revoke, project create: in the audit log with who did them.
    let (doomed, _) = env.token("doomed", "read", "payments")?;
    ok(env.admin(&["token", "revoke", &doomed]))?;
    let out = ok(env.admin(&["audit"]))?;
    let log = stdout(&out);
    let entry = |action: &str, target: &str| {
        log.lines()
            .find(|l| l.contains(action) && l.contains(target))
            .unwrap_or_else(|| panic!("no {action} of {target} in:\n{log}"))
            .to_string()
    };
    for line in [
        entry("token.create", &doomed),
        entry("token.revoke", &doomed),
        entry("project.create", "payments"),
    ] {
        assert!(line.contains("bootstrap admin"), "actor missing: {line}");
    }
    let out = ok(env.admin(&["audit", "--action", "token.revoke"]))?;
    assert_eq!(stdout(&out).lines().count(), 2, "{}", text(&out));
    let out = ok(env.admin(&["audit", "--project", "payments", "--limit", "2"]))?;
    assert_eq!(stdout(&out).lines().count(), 3, "{}", text(&out));
    // The audit log needs the operator scope.
    fails(env.with(&bound, &["audit"]), "PERMISSION_DENIED")?;

    // Delete refuses nothing here (every task finished) and revokes the project's tokens.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let out = env.admin(&["project", "delete", "payments"]).output()?;
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < end, "delete: {}", text(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
    fails(env.with(&bound, &["task", "list"]), "UNAUTHENTICATED")?;
    fails(env.admin(&["project", "get", "payments"]), "NOT_FOUND")?;
    Ok(())
}
