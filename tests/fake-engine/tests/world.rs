//! The outside world through the fixtures: image overlays and image errors, git refs
//! resolved to commits and trees, downloads, registry pushes with and without credentials.

mod support;

use scabbard_fake_engine::LocalRepo;
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn images_carry_their_fixture_tools_and_errors() {
    let world = World::new();
    world
        .fixtures
        .image_tool("golang:1.22", "go", r#"echo "go version go1.22 fake $*""#)
        .unwrap();
    world
        .fixtures
        .fail_image(
            "registry.test/missing:1",
            "failed to resolve image: not found",
        )
        .unwrap();
    let session = world.session().await;
    let q = session.query();
    let out = q
        .container()
        .from("golang:1.22")
        .with_exec(vec!["go", "version"])
        .stdout()
        .await
        .unwrap();
    assert_eq!(out, "go version go1.22 fake version\n");
    // Other images have the base only.
    let err = q
        .container()
        .from("python:3.12")
        .with_exec(vec!["go", "version"])
        .sync()
        .await
        .err()
        .expect("an error");
    assert_eq!(exec_error(&err).map(|e| e.0), Some(127));

    let err = q
        .container()
        .from("registry.test/missing:1")
        .with_exec(vec!["true"])
        .sync()
        .await
        .err()
        .expect("an error");
    assert!(exec_error(&err).is_none());
    assert_eq!(messages(&err), "failed to resolve image: not found");
}

#[tokio::test(flavor = "multi_thread")]
async fn git_refs_resolve_to_commits_and_trees() {
    let world = World::new();
    let repo = LocalRepo::init(world.path().join("app")).unwrap();
    let first = repo.commit(&[("README", "v1\n")], "first").unwrap();
    repo.tag("v1.0").unwrap();
    let url = "https://github.com/acme/app.git";
    world.fixtures.git_repo(url, repo.dir()).unwrap();
    let session = world.session().await;
    let q = session.query();

    let main = q.git(url).branch("main");
    assert_eq!(main.commit().await.unwrap(), first);
    assert_eq!(main.tree().file("README").contents().await.unwrap(), "v1\n");
    let build = |q: dagger_sdk::Query, git_ref: &str| {
        let git_ref = git_ref.to_string();
        async move {
            let tree = q.git(url).r#ref(git_ref).tree().id().await.unwrap();
            q.container()
                .from("alpine")
                .with_directory("/src", tree)
                .with_exec(sh("cat /src/README"))
                .stdout()
                .await
                .unwrap()
        }
    };
    assert_eq!(build(session.query(), "main").await, "v1\n");

    let second = repo.commit(&[("README", "v2\n")], "second").unwrap();
    assert_ne!(first, second);
    assert_eq!(q.git(url).branch("main").commit().await.unwrap(), second);
    assert_eq!(q.git(url).head().commit().await.unwrap(), second);
    assert_eq!(build(session.query(), "main").await, "v2\n");
    // The old commit and the tag still give the old tree, from the cache.
    assert_eq!(build(session.query(), &first).await, "v1\n");
    assert_eq!(q.git(url).tag("v1.0").commit().await.unwrap(), first);
    assert_eq!(build(session.query(), "v1.0").await, "v1\n");
    assert_eq!(
        world.engine.runs().unwrap().len(),
        2,
        "one run per commit: {:?}",
        world.engine.execs().unwrap()
    );

    // keepGitDir keeps the repository's .git (unless the tree discards it).
    let kept = q.git_opts(
        url,
        dagger_sdk::QueryGitOpts {
            experimental_service_host: None,
            http_auth_header: None,
            http_auth_token: None,
            http_auth_username: None,
            keep_git_dir: Some(true),
            ssh_auth_socket: None,
            ssh_known_hosts: None,
        },
    );
    let entries = kept.r#ref(first.as_str()).tree().entries().await.unwrap();
    assert_eq!(entries, [".git/", "README"]);
    let discarded = kept
        .r#ref(first.as_str())
        .tree_opts(dagger_sdk::GitRefTreeOpts {
            depth: None,
            discard_git_dir: Some(true),
            include_tags: None,
        })
        .entries()
        .await
        .unwrap();
    assert_eq!(discarded, ["README"]);
    let with_git = kept.r#ref(first.as_str()).tree().id().await.unwrap();
    let head = q
        .container()
        .from("alpine")
        .with_directory("/src", with_git)
        .with_exec(sh("cat /src/.git/HEAD"))
        .stdout()
        .await
        .unwrap();
    assert!(head.contains(&first), "detached at the commit: {head}");

    let err = q.git(url).branch("nope").commit().await.unwrap_err();
    assert!(
        messages(&err).contains("branch nope not found"),
        "{}",
        messages(&err)
    );
    let err = q
        .git("https://github.com/acme/unknown.git")
        .head()
        .commit()
        .await
        .unwrap_err();
    assert!(
        messages(&err).contains("no such repository"),
        "{}",
        messages(&err)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_come_from_the_http_table() {
    let world = World::new();
    let data = world.path().join("data.csv");
    std::fs::write(&data, "a,b\n1,2\n").unwrap();
    let url = "https://example.com/data.csv";
    world.fixtures.http_file(url, &data).unwrap();
    let session = world.session().await;
    let q = session.query();
    assert_eq!(q.http(url).contents().await.unwrap(), "a,b\n1,2\n");
    let file = q.http(url).id().await.unwrap();
    let rows = q
        .container()
        .from("alpine")
        .with_file("/data/in.csv", file)
        .with_exec(sh("wc -l < /data/in.csv"))
        .stdout()
        .await
        .unwrap();
    assert_eq!(rows.trim(), "2");
    std::fs::write(&data, "a,b\n1,2\n3,4\n").unwrap();
    assert_eq!(q.http(url).contents().await.unwrap(), "a,b\n1,2\n3,4\n");
    let err = q
        .http("https://example.com/other")
        .contents()
        .await
        .unwrap_err();
    assert!(messages(&err).contains("no such URL"), "{}", messages(&err));
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_checks_credentials_and_writes_the_image() {
    let world = World::new();
    world
        .fixtures
        .registry("registry.test", "bot", "s3cret")
        .unwrap();
    let session = world.session().await;
    let q = session.query();
    let built = q
        .container()
        .from("alpine")
        .with_exec(sh("echo app > /app.txt"))
        .sync()
        .await
        .unwrap();

    let err = built.publish("registry.test/acme/app:1").await.unwrap_err();
    assert!(
        messages(&err)
            .contains("401 Unauthorized: authentication required to push to registry.test"),
        "{}",
        messages(&err)
    );
    let wrong = q.set_secret("reg-wrong", "nope").id().await.unwrap();
    let err = built
        .with_registry_auth("registry.test", "bot", wrong)
        .publish("registry.test/acme/app:1")
        .await
        .unwrap_err();
    assert!(messages(&err).contains("401"), "{}", messages(&err));
    assert!(world.fixtures.pushes().unwrap().is_empty());

    let right = q.set_secret("reg", "s3cret").id().await.unwrap();
    let pushed = built
        .with_registry_auth("registry.test", "bot", right)
        .publish("registry.test/acme/app:1")
        .await
        .unwrap();
    let pushes = world.fixtures.pushes().unwrap();
    assert_eq!(pushes.len(), 1);
    assert_eq!(pushes[0].address, "registry.test/acme/app:1");
    assert_eq!(
        pushed,
        format!("registry.test/acme/app:1@sha256:{}", pushes[0].digest)
    );
    let image = std::fs::File::open(world.fixtures.pushed_image(&pushes[0].digest)).unwrap();
    let mut archive = tar::Archive::new(image);
    let mut found = None;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some("app.txt") {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut entry, &mut s).unwrap();
            found = Some(s);
        }
    }
    assert_eq!(found.as_deref(), Some("app\n"));

    // Unlisted registries take anonymous pushes; the same filesystem packs the same.
    let anon = built.publish("other.test/app:latest").await.unwrap();
    assert!(anon.ends_with(&pushes[0].digest), "{anon}");
}
