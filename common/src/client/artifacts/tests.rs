//! [`download_artifact`] against an in-process `ArtifactService` that serves archives from
//! memory and can cut streams, corrupt bytes and refuse.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::*;
use crate::client;
use crate::proto::artifact_service_server::{ArtifactService, ArtifactServiceServer};
use crate::proto::{
    ArtifactKind, DownloadArtifactResponse, ListArtifactsRequest, ListArtifactsResponse,
    StatArtifactRequest, UploadArtifactRequest,
};

/// What the next download call does.
#[derive(Debug, Clone, Copy)]
enum Next {
    /// Sends this many bytes from the offset, then fails the stream.
    CutAfter(usize),
    /// Sends everything with one byte flipped.
    Corrupt,
    /// Refuses with this code.
    Refuse(tonic::Code),
}

#[derive(Default)]
struct Fake {
    data: Vec<u8>,
    artifact: ArtifactRef,
    script: Mutex<VecDeque<Next>>,
    /// Offsets the calls asked for.
    offsets: Mutex<Vec<u64>>,
    /// Bearer tokens the calls carried.
    tokens: Mutex<Vec<String>>,
}

type Stream = ReceiverStream<std::result::Result<DownloadArtifactResponse, Status>>;

#[tonic::async_trait]
impl ArtifactService for Arc<Fake> {
    type DownloadStream = Stream;

    async fn upload(
        &self,
        _r: Request<tonic::Streaming<UploadArtifactRequest>>,
    ) -> std::result::Result<Response<ArtifactRef>, Status> {
        Err(Status::unimplemented("upload"))
    }

    async fn download(
        &self,
        r: Request<DownloadArtifactRequest>,
    ) -> std::result::Result<Response<Stream>, Status> {
        let token = r
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        self.tokens.lock().unwrap().push(token);
        let req = r.into_inner();
        if req.name != self.artifact.name {
            return Err(Status::not_found(format!("no artifact {}", req.name)));
        }
        self.offsets.lock().unwrap().push(req.offset);
        let next = self.script.lock().unwrap().pop_front();
        if let Some(Next::Refuse(code)) = next {
            return Err(Status::new(code, "refused by the test"));
        }
        let mut rest = self.data[req.offset as usize..].to_vec();
        let mut cut = None;
        match next {
            Some(Next::CutAfter(n)) => {
                rest.truncate(n);
                cut = Some(());
            }
            Some(Next::Corrupt) => {
                if let Some(b) = rest.first_mut() {
                    *b ^= 0xff;
                }
            }
            _ => {}
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let artifact = self.artifact.clone();
        tokio::spawn(async move {
            let first = DownloadArtifactResponse {
                part: Some(Part::Artifact(artifact)),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            for piece in rest.chunks(1000) {
                let msg = DownloadArtifactResponse {
                    part: Some(Part::Data(piece.to_vec())),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            if cut.is_some() {
                let _ = tx
                    .send(Err(Status::unavailable("stream cut by the test")))
                    .await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn stat(
        &self,
        _r: Request<StatArtifactRequest>,
    ) -> std::result::Result<Response<ArtifactRef>, Status> {
        Err(Status::unimplemented("stat"))
    }

    async fn list(
        &self,
        _r: Request<ListArtifactsRequest>,
    ) -> std::result::Result<Response<ListArtifactsResponse>, Status> {
        Err(Status::unimplemented("list"))
    }
}

/// Serves `fake` on a loopback port; returns its address.
async fn serve(fake: Arc<Fake>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ArtifactServiceServer::new(fake))
            .serve_with_incoming(incoming),
    );
    addr
}

fn fake(data: Vec<u8>, script: &[Next]) -> Arc<Fake> {
    let mut h = Sha256::default();
    h.update(&data);
    Arc::new(Fake {
        artifact: ArtifactRef {
            task_id: "producer".into(),
            name: "dist".into(),
            fencing_token: 3,
            kind: ArtifactKind::Directory as i32,
            sha256: h.finish(),
            size: data.len() as u64,
            ..Default::default()
        },
        data,
        script: Mutex::new(script.iter().copied().collect()),
        ..Default::default()
    })
}

fn request() -> DownloadArtifactRequest {
    DownloadArtifactRequest {
        task_id: "producer".into(),
        name: "dist".into(),
        offset: 999, // ignored: downloads start at 0
        for_task_id: "consumer".into(),
        for_fencing_token: 7,
    }
}

fn quick() -> DownloadOptions {
    DownloadOptions {
        max_tries: 4,
        backoff: Backoff {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(20),
            ..Backoff::default()
        },
        idle_timeout: Duration::from_secs(10),
    }
}

/// Downloads from `addr` into memory, counting the connect calls and the errors they got.
async fn fetch(
    addr: &str,
    expected: Option<&str>,
    opts: &DownloadOptions,
) -> (Result<Downloaded>, Vec<u8>, Vec<Option<String>>) {
    let seen = Mutex::new(Vec::new());
    let mut sink = Vec::new();
    let r = download_artifact(
        |last: Option<&Error>| {
            seen.lock().unwrap().push(last.map(|e| e.to_string()));
            let addr = addr.to_string();
            async move {
                let ch = client::connect(&addr).await?;
                Ok(ArtifactServiceClient::new(client::authed(
                    ch,
                    Some("agent-token"),
                )?))
            }
        },
        &request(),
        expected,
        &mut sink,
        opts,
    )
    .await;
    (r, sink, seen.into_inner().unwrap())
}

fn payload() -> Vec<u8> {
    (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test]
async fn whole_download_is_checked_and_carries_the_token() {
    let f = fake(payload(), &[]);
    let addr = serve(f.clone()).await;
    let want = f.artifact.sha256.clone();
    let (r, bytes, connects) = fetch(&addr, Some(&want), &quick()).await;
    let d = r.unwrap();
    assert_eq!(bytes, payload());
    assert_eq!(d.artifact.sha256, want);
    assert_eq!((d.resumes, d.restarts, d.received), (0, 0, 10_000));
    assert_eq!(connects, [None]);
    assert_eq!(*f.offsets.lock().unwrap(), [0]);
    assert_eq!(*f.tokens.lock().unwrap(), ["Bearer agent-token"]);
}

#[tokio::test]
async fn dropped_streams_resume_at_the_next_byte() {
    let f = fake(payload(), &[Next::CutAfter(3_000), Next::CutAfter(2_500)]);
    let addr = serve(f.clone()).await;
    let (r, bytes, connects) = fetch(&addr, None, &quick()).await;
    let d = r.unwrap();
    assert_eq!(bytes, payload());
    assert_eq!(*f.offsets.lock().unwrap(), [0, 3_000, 5_500]);
    assert_eq!(d.resumes, 2);
    assert_eq!(d.received, 10_000, "no byte was fetched twice");
    // Each reconnect learns why the previous try ended.
    assert_eq!(connects.len(), 3);
    assert!(
        connects[1]
            .as_deref()
            .unwrap()
            .contains("stream cut by the test")
    );
}

#[tokio::test]
async fn a_digest_mismatch_is_downloaded_again_from_scratch_once() {
    let f = fake(payload(), &[Next::Corrupt]);
    let addr = serve(f.clone()).await;
    let (r, bytes, _) = fetch(&addr, None, &quick()).await;
    let d = r.unwrap();
    assert_eq!(bytes, payload(), "the corrupt bytes were dropped");
    assert_eq!(d.restarts, 1);
    assert_eq!(*f.offsets.lock().unwrap(), [0, 0]);

    let f = fake(payload(), &[Next::Corrupt, Next::Corrupt]);
    let addr = serve(f.clone()).await;
    let (r, _, _) = fetch(&addr, None, &quick()).await;
    let e = r.unwrap_err();
    assert!(matches!(e, Error::Internal(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&f.artifact.sha256) && msg.contains("twice"),
        "{msg}"
    );
    assert_eq!(f.offsets.lock().unwrap().len(), 2, "retried once only");
}

#[tokio::test]
async fn refusals_end_at_once_and_a_dead_store_after_the_tries() {
    let f = fake(payload(), &[Next::Refuse(tonic::Code::PermissionDenied)]);
    let addr = serve(f.clone()).await;
    let (r, _, _) = fetch(&addr, None, &quick()).await;
    assert!(matches!(r, Err(Error::PermissionDenied(_))), "{r:?}");
    assert_eq!(f.offsets.lock().unwrap().len(), 1);

    // A controller without an artifact store is not asked again.
    let f = fake(payload(), &[Next::Refuse(tonic::Code::Unimplemented)]);
    let addr = serve(f.clone()).await;
    let (r, _, connects) = fetch(&addr, None, &quick()).await;
    assert!(r.is_err());
    assert_eq!(connects.len(), 1);

    // Another digest than the one resolved: refused before any byte is kept.
    let f = fake(payload(), &[]);
    let addr = serve(f.clone()).await;
    let (r, bytes, _) = fetch(&addr, Some(&"0".repeat(64)), &quick()).await;
    assert!(matches!(r, Err(Error::FailedPrecondition(_))), "{r:?}");
    assert!(bytes.is_empty());

    let unavailable = [Next::Refuse(tonic::Code::Unavailable); 8];
    let f = fake(payload(), &unavailable);
    let addr = serve(f.clone()).await;
    let (r, _, connects) = fetch(&addr, None, &quick()).await;
    let e = r.unwrap_err();
    assert!(e.to_string().contains("4 tries"), "{e}");
    assert_eq!(connects.len(), 4);
}

#[tokio::test]
async fn files_are_restarted_from_empty() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("a.tar.zst");
    let mut file = tokio::fs::File::create(&path).await.unwrap();
    ArtifactSink::write(&mut file, b"stale bytes")
        .await
        .unwrap();
    file.restart().await.unwrap();
    ArtifactSink::write(&mut file, b"fresh").await.unwrap();
    file.finish().await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"fresh");
}
