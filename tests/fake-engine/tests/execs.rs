//! Execs against the built `fake-dagger`, driven by the real dagger-sdk: they really run,
//! their files export byte for byte, identical chains run once, host directories and cache
//! volumes behave like Dagger's, exit codes follow `expect`.

mod support;

use dagger_sdk::{ContainerWithExecOpts, HostDirectoryOpts, ReturnType};
use support::*;

fn expect_any<'a>() -> ContainerWithExecOpts<'a> {
    ContainerWithExecOpts {
        expand: None,
        expect: Some(ReturnType::Any),
        experimental_privileged_nesting: None,
        insecure_root_capabilities: None,
        no_init: None,
        redirect_stderr: None,
        redirect_stdin: None,
        redirect_stdout: None,
        stdin: None,
        use_entrypoint: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_really_runs_and_its_files_export_byte_for_byte() {
    let world = World::new();
    let session = world.session().await;
    let q = session.query();
    let built = q
        .container()
        .from("alpine:3.20")
        .with_exec(sh(
            r"mkdir -p /out/sub; echo hi > /out/x; printf '\000\377\n' > /out/sub/bin; ln -s x /out/link; echo done",
        ))
        .sync()
        .await
        .unwrap();
    assert_eq!(built.stdout().await.unwrap(), "done\n");
    assert_eq!(built.exit_code().await.unwrap(), 0);

    // A stale file in the target is replaced by the directory's content.
    let dest = world.path().join("exported/out");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("stale"), "old").unwrap();
    let written = built
        .directory("/out")
        .export(dest.to_str().unwrap())
        .await
        .unwrap();
    assert_eq!(written, dest.to_str().unwrap());
    assert_eq!(std::fs::read(dest.join("x")).unwrap(), b"hi\n");
    assert_eq!(std::fs::read(dest.join("sub/bin")).unwrap(), b"\x00\xff\n");
    assert_eq!(
        std::fs::read_link(dest.join("link")).unwrap().to_str(),
        Some("x")
    );
    assert!(!dest.join("stale").exists());

    let file = world.path().join("single/x.txt");
    built
        .file("/out/x")
        .export(file.to_str().unwrap())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"hi\n");
    assert_eq!(built.file("/out/x").contents().await.unwrap(), "hi\n");
    assert!(built.exists("/out/sub/bin").await.unwrap());
    assert!(!built.exists("/out/nope").await.unwrap());
    let mut entries = built.directory("/out").entries().await.unwrap();
    entries.sort();
    assert_eq!(entries, ["link", "sub/", "x"]);

    // Its output went to the session's stderr as it ran.
    session.wait_for_stderr("] done").await;
    let runs = world.engine.runs().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].image.as_deref(), Some("alpine:3.20"));
    assert_eq!(runs[0].exit_code, 0);
}

async fn echo_with_env(session: &Session, value: &str) -> String {
    session
        .query()
        .container()
        .from("alpine")
        .with_env_variable("STAMP", value)
        .with_exec(sh("echo stamp=$STAMP"))
        .stdout()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn identical_chains_run_once_and_any_difference_runs_again() {
    let world = World::new();
    let script = sh("echo stamp=$STAMP");
    let args: Vec<&str> = script.iter().map(String::as_str).collect();
    {
        let session = world.session().await;
        assert_eq!(echo_with_env(&session, "a").await, "stamp=a\n");
        assert_eq!(echo_with_env(&session, "a").await, "stamp=a\n");
        assert_eq!(world.engine.runs_of(&args).unwrap(), 1);
    }
    // A later session of the same engine: answered from the cache, and it says so.
    let session = world.session().await;
    assert_eq!(echo_with_env(&session, "a").await, "stamp=a\n");
    assert_eq!(world.engine.runs_of(&args).unwrap(), 1);
    session
        .wait_for_stderr("CACHED sh -c 'echo stamp=$STAMP'")
        .await;
    let cached: Vec<_> = world
        .engine
        .execs()
        .unwrap()
        .into_iter()
        .filter(|r| r.cached)
        .collect();
    assert_eq!(cached.len(), 1, "one cache answer per session");
    assert_eq!(cached[0].env.get("STAMP").map(String::as_str), Some("a"));

    // A different value makes a different chain.
    assert_eq!(echo_with_env(&session, "b").await, "stamp=b\n");
    assert_eq!(world.engine.runs_of(&args).unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_build_on_the_previous_result() {
    let world = World::new();
    let session = world.session().await;
    let q = session.query();
    let first = q
        .container()
        .from("alpine")
        .with_workdir("/work")
        .with_new_file("input.txt", "from withNewFile\n")
        .with_exec(sh("cp input.txt copy.txt; pwd"))
        .sync()
        .await
        .unwrap();
    assert_eq!(first.stdout().await.unwrap(), "/work\n");
    let second = first
        .with_exec_opts(
            sh("cat copy.txt; echo to-stderr >&2"),
            ContainerWithExecOpts {
                redirect_stdout: Some("/work/captured"),
                ..expect_any()
            },
        )
        .sync()
        .await
        .unwrap();
    assert_eq!(second.stdout().await.unwrap(), "", "redirected");
    assert_eq!(second.stderr().await.unwrap(), "to-stderr\n");
    assert_eq!(
        second.file("captured").contents().await.unwrap(),
        "from withNewFile\n"
    );
    let piped = second
        .with_exec_opts(
            vec!["cat".to_string()],
            ContainerWithExecOpts {
                stdin: Some("through stdin"),
                ..expect_any()
            },
        )
        .stdout()
        .await
        .unwrap();
    assert_eq!(piped, "through stdin");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_directories_are_read_when_resolved() {
    let world = World::new();
    let src = world.path().join("src");
    std::fs::create_dir_all(src.join("target")).unwrap();
    std::fs::write(src.join("a.txt"), "one\n").unwrap();
    std::fs::write(src.join("target/big"), "skip me\n").unwrap();
    let session = world.session().await;
    let read = |q: dagger_sdk::Query| {
        let src = src.clone();
        async move {
            let dir = q
                .host()
                .directory_opts(
                    src.to_str().unwrap(),
                    HostDirectoryOpts {
                        exclude: Some(vec!["target"]),
                        gitignore: None,
                        include: None,
                        no_cache: None,
                    },
                )
                .id()
                .await
                .unwrap();
            q.container()
                .from("alpine")
                .with_directory("/src", dir)
                .with_exec(sh("cat /src/a.txt; ls /src"))
                .stdout()
                .await
                .unwrap()
        }
    };
    assert_eq!(read(session.query()).await, "one\na.txt\n");
    assert_eq!(read(session.query()).await, "one\na.txt\n");
    assert_eq!(
        world.engine.runs().unwrap().len(),
        1,
        "same content, same chain"
    );
    std::fs::write(src.join("a.txt"), "two\n").unwrap();
    assert_eq!(read(session.query()).await, "two\na.txt\n");
    assert_eq!(
        world.engine.runs().unwrap().len(),
        2,
        "new content runs again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mounted_directories_are_seen_by_execs_but_not_kept() {
    let world = World::new();
    let src = world.path().join("mounted");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("in.txt"), "input\n").unwrap();
    let session = world.session().await;
    let q = session.query();
    let dir = q
        .host()
        .directory(src.to_str().unwrap())
        .id()
        .await
        .unwrap();
    let after = q
        .container()
        .from("alpine")
        .with_new_file("/data/keep.txt", "under the mount\n")
        .with_mounted_directory("/data", dir)
        .with_exec(sh("cat /data/in.txt; ls /data; echo scribble > /data/in.txt; mkdir /out; cp /data/in.txt /out/"))
        .sync()
        .await
        .unwrap();
    assert_eq!(
        after.stdout().await.unwrap(),
        "input\nin.txt\n",
        "the mount covers /data"
    );
    assert_eq!(
        after.file("/out/in.txt").contents().await.unwrap(),
        "scribble\n"
    );
    // The mount is not part of the result: without it, what it covered is back.
    let underneath = after.without_mount("/data");
    assert_eq!(
        underneath.file("/data/keep.txt").contents().await.unwrap(),
        "under the mount\n"
    );
    assert!(!underneath.exists("/data/in.txt").await.unwrap());
    // The host directory is untouched.
    assert_eq!(
        std::fs::read_to_string(src.join("in.txt")).unwrap(),
        "input\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_volumes_persist_across_sessions_and_stay_out_of_results() {
    let world = World::new();
    {
        let session = world.session().await;
        let q = session.query();
        let vol = q.cache_volume("gomod").id().await.unwrap();
        let after = q
            .container()
            .from("alpine")
            .with_mounted_cache("/cache", vol)
            .with_exec(sh("echo first > /cache/v; echo wrote"))
            .sync()
            .await
            .unwrap();
        assert!(
            !after.exists("/cache/v").await.unwrap(),
            "mounts are not in the result"
        );
    }
    let session = world.session().await;
    let q = session.query();
    let vol = q.cache_volume("gomod").id().await.unwrap();
    let out = q
        .container()
        .from("alpine")
        .with_mounted_cache("/cache", vol)
        .with_exec(sh("cat /cache/v"))
        .stdout()
        .await
        .unwrap();
    assert_eq!(out, "first\n");
    let data = world.engine.cache_volume("gomod").expect("volume data");
    assert_eq!(std::fs::read_to_string(data.join("v")).unwrap(), "first\n");
    assert_eq!(world.engine.cache_volumes().unwrap(), ["gomod"]);
    let other = world.engine.runs().unwrap();
    assert_eq!(other[1].caches, ["gomod:/cache"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_follow_expect() {
    let world = World::new();
    let session = world.session().await;
    let q = session.query();
    let failing = sh("echo out; echo err >&2; exit 3");
    let err = q
        .container()
        .from("alpine")
        .with_exec(failing.clone())
        .sync()
        .await
        .err()
        .expect("an error");
    assert_eq!(
        exec_error(&err),
        Some((3, "out\n".into(), "err\n".into())),
        "{err:?}"
    );
    assert!(
        messages(&err).contains("exit code: 3"),
        "{}",
        messages(&err)
    );

    let tolerated = q
        .container()
        .from("alpine")
        .with_exec_opts(failing, expect_any())
        .sync()
        .await
        .unwrap();
    assert_eq!(tolerated.exit_code().await.unwrap(), 3);
    assert_eq!(tolerated.stderr().await.unwrap(), "err\n");

    let missing = q
        .container()
        .from("alpine")
        .with_exec_opts(
            vec!["no-such-tool".to_string(), "x".to_string()],
            expect_any(),
        )
        .sync()
        .await
        .unwrap();
    assert_eq!(missing.exit_code().await.unwrap(), 127);
    assert!(
        missing
            .stderr()
            .await
            .unwrap()
            .contains("no-such-tool: not found")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gpus_secrets_and_users_reach_the_exec() {
    let world = World::new();
    let session = world.session().await;
    let q = session.query();
    let all = q
        .container()
        .from("alpine")
        .experimental_with_all_gp_us()
        .with_exec(sh("echo $NVIDIA_VISIBLE_DEVICES"))
        .stdout()
        .await
        .unwrap();
    assert_eq!(all, "all\n");
    let some = q
        .container()
        .from("alpine")
        .experimental_with_gpu(vec!["0", "2"])
        .with_exec(sh("echo $NVIDIA_VISIBLE_DEVICES"))
        .stdout()
        .await
        .unwrap();
    assert_eq!(some, "0,2\n");

    let secret = q.set_secret("npm", "v1-secret").id().await.unwrap();
    let token = q
        .container()
        .from("alpine")
        .with_secret_variable("TOKEN", secret)
        .with_exec(sh("echo ${#TOKEN}; id -u"))
        .stdout()
        .await
        .unwrap();
    assert_eq!(token, "9\n0\n");
    let as_nobody = q
        .container()
        .from("alpine")
        .with_user("nobody")
        .with_exec(sh("id -u; touch /root/x 2>/dev/null || echo denied"))
        .stdout()
        .await
        .unwrap();
    assert_eq!(as_nobody, "65534\ndenied\n");
    let log = std::fs::read_to_string(world.engine.dir().join("execs.jsonl")).unwrap();
    assert!(
        !log.contains("v1-secret"),
        "secret values are never recorded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sessions_of_one_engine_share_a_running_exec() {
    let world = World::new();
    let (a, b) = (world.session().await, world.session().await);
    async fn run(s: &Session) -> Result<String, dagger_sdk::errors::DaggerError> {
        s.query()
            .container()
            .from("alpine")
            .with_exec(sh("sleep 1; echo shared"))
            .stdout()
            .await
    }
    let (x, y) = tokio::join!(run(&a), run(&b));
    assert_eq!(x.unwrap(), "shared\n");
    assert_eq!(y.unwrap(), "shared\n");
    let execs = world.engine.execs().unwrap();
    assert_eq!(execs.iter().filter(|r| !r.cached).count(), 1, "{execs:?}");
    assert_eq!(execs.iter().filter(|r| r.cached).count(), 1, "{execs:?}");
}
