//! Tests of input placement and artifact collection on real directories.

use std::os::unix::fs::{MetadataExt, symlink};

use super::*;

fn spec(name: &str, path: &str, optional: bool) -> ArtifactSpec {
    ArtifactSpec {
        name: name.into(),
        path: path.into(),
        optional,
    }
}

fn input(path: &str, local: &Path, kind: ArtifactKind) -> StagedInput {
    StagedInput {
        from: format!("${{{{ tasks.p.artifacts.{path} }}}}"),
        path: path.into(),
        local: local.to_path_buf(),
        kind,
    }
}

fn user_error<T: std::fmt::Debug>(r: Result<T, FileError>) -> String {
    match r {
        Err(FileError::User(m)) => m,
        other => panic!("expected a user error, got {other:?}"),
    }
}

#[test]
fn paths_must_stay_inside() {
    assert_eq!(inside("a/./b/").unwrap(), PathBuf::from("a/b"));
    assert_eq!(inside("./dist").unwrap(), PathBuf::from("dist"));
    assert!(inside("../x").unwrap_err().contains(".."));
    assert!(inside("a/../../x").unwrap_err().contains(".."));
    assert!(inside("/etc/passwd").unwrap_err().contains("absolute"));
    assert!(inside(".").unwrap_err().contains("work dir itself"));
    assert!(inside("").unwrap_err().contains("work dir itself"));
}

#[test]
fn inputs_are_copied_at_their_paths_and_owned_by_the_task_user() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let tree = cache.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(tree.join("bin/app"), b"app").unwrap();
    symlink("app", tree.join("bin/link")).unwrap();
    let file = cache.join("file");
    std::fs::write(&file, b"report").unwrap();
    let work = d.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let nobody = (65534, 65534);
    place_inputs(
        &work,
        &[
            input("in/dist", &tree, ArtifactKind::Directory),
            input("./in/deep/report.json", &file, ArtifactKind::File),
        ],
        Some(nobody),
    )
    .unwrap();
    assert_eq!(std::fs::read(work.join("in/dist/bin/app")).unwrap(), b"app");
    assert_eq!(
        std::fs::read_link(work.join("in/dist/bin/link")).unwrap(),
        Path::new("app")
    );
    assert_eq!(
        std::fs::read(work.join("in/deep/report.json")).unwrap(),
        b"report"
    );
    for p in [
        "in",
        "in/dist",
        "in/dist/bin/app",
        "in/dist/bin/link",
        "in/deep/report.json",
    ] {
        let m = std::fs::symlink_metadata(work.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), nobody, "{p}");
    }
    // Copies, not links: the cache keeps its inode and owner.
    let src = std::fs::metadata(tree.join("bin/app")).unwrap();
    let copy = std::fs::metadata(work.join("in/dist/bin/app")).unwrap();
    assert_ne!(src.ino(), copy.ino());
    assert_eq!(src.uid(), 0);
}

#[test]
fn input_paths_that_leave_the_work_dir_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let outside = d.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    // A directory input carrying a link out, then an input placed through that link.
    let linky = d.path().join("linky");
    std::fs::create_dir(&linky).unwrap();
    symlink(&outside, linky.join("out")).unwrap();
    let work = d.path().join("work");
    std::fs::create_dir(&work).unwrap();
    for (path, want) in [
        ("../escape", ".."),
        ("/tmp/abs", "absolute"),
        (".", "work dir itself"),
    ] {
        let m = user_error(place_inputs(
            &work,
            &[input(path, &file, ArtifactKind::File)],
            None,
        ));
        assert!(m.contains(path) && m.contains(want), "{path}: {m}");
    }
    let m = user_error(place_inputs(
        &work,
        &[
            input("in", &linky, ArtifactKind::Directory),
            input("in/out/pwned", &file, ArtifactKind::File),
        ],
        None,
    ));
    assert!(m.contains("symbolic link in/out"), "{m}");
    assert!(!outside.join("pwned").exists());
    let m = user_error(place_inputs(
        &work,
        &[input("in", &file, ArtifactKind::File)],
        None,
    ));
    assert!(m.contains("already taken"), "{m}");
}

#[test]
fn artifacts_move_to_the_artifact_dir() {
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("work");
    std::fs::create_dir_all(work.join("build/dist/a/b")).unwrap();
    std::fs::write(work.join("build/dist/a/b/c.txt"), b"nested").unwrap();
    symlink("b/c.txt", work.join("build/dist/a/link")).unwrap();
    std::fs::write(work.join("report.json"), b"{}").unwrap();
    let out = d.path().join("artifacts");
    let c = collect_artifacts(
        &work,
        &[
            spec("dist", "build/dist", false),
            spec("report", "./report.json", false),
            spec("coverage", "coverage/", true),
        ],
        &out,
    )
    .unwrap();
    assert_eq!(
        c.produced,
        [
            ProducedArtifact {
                name: "dist".into(),
                kind: ArtifactKind::Directory
            },
            ProducedArtifact {
                name: "report".into(),
                kind: ArtifactKind::File
            },
        ]
    );
    assert_eq!(
        std::fs::read(out.join("dist/a/b/c.txt")).unwrap(),
        b"nested"
    );
    assert_eq!(
        std::fs::read_link(out.join("dist/a/link")).unwrap(),
        Path::new("b/c.txt")
    );
    assert_eq!(std::fs::read(out.join("report")).unwrap(), b"{}");
    assert!(!work.join("build/dist").exists(), "moved, not copied");
    assert_eq!(c.notes.len(), 1);
    assert!(
        c.notes[0].contains("optional artifact coverage"),
        "{:?}",
        c.notes
    );
}

#[test]
fn missing_required_artifacts_are_named() {
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("file"), b"x").unwrap();
    let m = user_error(collect_artifacts(
        &work,
        &[
            spec("dist", "dist", false),
            spec("deep", "file/under/a/file", false),
            spec("opt", "nothing", true),
        ],
        &d.path().join("out"),
    ));
    assert!(
        m.contains("required artifact dist") && m.contains("\"dist\""),
        "{m}"
    );
    assert!(m.contains("required artifact deep"), "{m}");
    assert!(!m.contains("opt"), "{m}");
    assert!(!d.path().join("out").exists(), "nothing moved on failure");
}

#[test]
fn artifact_paths_that_escape_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let secret = d.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("key"), b"private").unwrap();
    symlink(&secret, work.join("out")).unwrap();
    symlink(secret.join("key"), work.join("key-link")).unwrap();
    let out = d.path().join("artifacts");
    for (path, want) in [
        ("../secret", ".."),
        ("/etc/passwd", "absolute"),
        ("out/key", "symbolic link out"),
        ("out", "is a symbolic link"),
        ("key-link", "is a symbolic link"),
    ] {
        let m = user_error(collect_artifacts(&work, &[spec("x", path, false)], &out));
        assert!(m.contains("artifact x") && m.contains(want), "{path}: {m}");
    }
    let m = user_error(collect_artifacts(
        &work,
        &[spec("../x", "out", false)],
        &out,
    ));
    assert!(m.contains("not valid"), "{m}");
    assert!(secret.join("key").exists());
    assert!(!out.exists());
}
