//! An in-process `ArtifactService` for the worker's tests: keeps archives in memory, checks
//! uploads as the contract says (header first, exact size, SHA-256), and follows a script
//! that cuts streams, corrupts downloads or refuses calls. The real store is the
//! controller's; the end-to-end tests use it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use scabbard_common::artifact::Sha256;
use scabbard_common::proto::artifact_service_server::{ArtifactService, ArtifactServiceServer};
use scabbard_common::proto::{
    ArtifactKind, ArtifactRef, ArtifactUploadHeader, DownloadArtifactRequest,
    DownloadArtifactResponse, ListArtifactsRequest, ListArtifactsResponse, StatArtifactRequest,
    UploadArtifactRequest, download_artifact_response, upload_artifact_request,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// What the next call of a kind does.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Next {
    /// Downloads: send this many bytes, then fail the stream. Uploads: fail after reading
    /// this many bytes.
    CutAfter(usize),
    /// Downloads: flip the first byte sent.
    Corrupt,
    /// Refuse with this code.
    Refuse(tonic::Code),
}

/// Stored archives by (task id, name).
type Objects = HashMap<(String, String), (ArtifactRef, Vec<u8>)>;

/// The fake store.
#[derive(Default)]
pub(crate) struct FakeStore {
    objects: Mutex<Objects>,
    uploads: Mutex<VecDeque<Next>>,
    downloads: Mutex<VecDeque<Next>>,
    /// Every upload header received, in order.
    pub(crate) headers: Mutex<Vec<ArtifactUploadHeader>>,
    /// Every download request received, in order.
    pub(crate) requests: Mutex<Vec<DownloadArtifactRequest>>,
    /// The bearer token of every call.
    pub(crate) tokens: Mutex<Vec<String>>,
}

impl FakeStore {
    /// Stores `bytes` as artifact `task_id`/`name`; returns its ref.
    pub(crate) fn put(
        &self,
        task_id: &str,
        name: &str,
        kind: ArtifactKind,
        bytes: Vec<u8>,
    ) -> ArtifactRef {
        let mut h = Sha256::default();
        h.update(&bytes);
        let r = ArtifactRef {
            task_id: task_id.into(),
            name: name.into(),
            fencing_token: 1,
            kind: kind as i32,
            sha256: h.finish(),
            size: bytes.len() as u64,
            ..Default::default()
        };
        self.objects
            .lock()
            .unwrap()
            .insert((task_id.into(), name.into()), (r.clone(), bytes));
        r
    }

    /// The stored archive of `task_id`/`name`.
    pub(crate) fn get(&self, task_id: &str, name: &str) -> Option<(ArtifactRef, Vec<u8>)> {
        self.objects
            .lock()
            .unwrap()
            .get(&(task_id.to_string(), name.to_string()))
            .cloned()
    }

    /// Queues what the next uploads do.
    pub(crate) fn script_uploads(&self, next: &[Next]) {
        self.uploads.lock().unwrap().extend(next.iter().copied());
    }

    /// Queues what the next downloads do.
    pub(crate) fn script_downloads(&self, next: &[Next]) {
        self.downloads.lock().unwrap().extend(next.iter().copied());
    }

    fn token<T>(&self, r: &Request<T>) {
        let t = r
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        self.tokens.lock().unwrap().push(t);
    }
}

/// Serves `store` on a loopback port; returns the address.
pub(crate) async fn serve(store: Arc<FakeStore>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ArtifactServiceServer::new(Service(store)))
            .serve_with_incoming(incoming),
    );
    addr
}

struct Service(Arc<FakeStore>);

type Stream = ReceiverStream<Result<DownloadArtifactResponse, Status>>;

#[tonic::async_trait]
impl ArtifactService for Service {
    type DownloadStream = Stream;

    async fn upload(
        &self,
        r: Request<tonic::Streaming<UploadArtifactRequest>>,
    ) -> Result<Response<ArtifactRef>, Status> {
        self.0.token(&r);
        let mut stream = r.into_inner();
        let header = match stream.message().await? {
            Some(UploadArtifactRequest {
                part: Some(upload_artifact_request::Part::Header(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("the header must come first")),
        };
        self.0.headers.lock().unwrap().push(header.clone());
        let next = self.0.uploads.lock().unwrap().pop_front();
        if let Some(Next::Refuse(code)) = next {
            return Err(Status::new(
                code,
                format!("refused {} by the test", header.name),
            ));
        }
        let mut data = Vec::new();
        while let Some(m) = stream.message().await? {
            match m.part {
                Some(upload_artifact_request::Part::Data(d)) => data.extend_from_slice(&d),
                _ => return Err(Status::invalid_argument("a second header")),
            }
            if let Some(Next::CutAfter(n)) = next
                && data.len() >= n
            {
                return Err(Status::unavailable("upload cut by the test"));
            }
        }
        let mut h = Sha256::default();
        h.update(&data);
        if data.len() as u64 != header.size || h.finish() != header.sha256 {
            return Err(Status::invalid_argument(
                "size or SHA-256 does not match the header",
            ));
        }
        let r = ArtifactRef {
            task_id: header.task_id.clone(),
            name: header.name.clone(),
            fencing_token: header.fencing_token,
            kind: header.kind,
            sha256: header.sha256.clone(),
            size: header.size,
            created_at_ms: 1,
            ..Default::default()
        };
        self.0
            .objects
            .lock()
            .unwrap()
            .insert((header.task_id, header.name), (r.clone(), data));
        Ok(Response::new(r))
    }

    async fn download(
        &self,
        r: Request<DownloadArtifactRequest>,
    ) -> Result<Response<Stream>, Status> {
        self.0.token(&r);
        let req = r.into_inner();
        self.0.requests.lock().unwrap().push(req.clone());
        let Some((artifact, bytes)) = self.0.get(&req.task_id, &req.name) else {
            return Err(Status::not_found("no such artifact"));
        };
        let next = self.0.downloads.lock().unwrap().pop_front();
        if let Some(Next::Refuse(code)) = next {
            return Err(Status::new(code, "refused by the test"));
        }
        let mut rest = bytes[req.offset as usize..].to_vec();
        let mut cut = false;
        match next {
            Some(Next::CutAfter(n)) => {
                rest.truncate(n);
                cut = true;
            }
            Some(Next::Corrupt) => {
                if let Some(b) = rest.first_mut() {
                    *b ^= 0xff;
                }
            }
            _ => {}
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use download_artifact_response::Part;
            let first = DownloadArtifactResponse {
                part: Some(Part::Artifact(artifact)),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            for piece in rest.chunks(64 * 1024) {
                let msg = DownloadArtifactResponse {
                    part: Some(Part::Data(piece.to_vec())),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            if cut {
                let _ = tx
                    .send(Err(Status::unavailable("download cut by the test")))
                    .await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn stat(
        &self,
        _r: Request<StatArtifactRequest>,
    ) -> Result<Response<ArtifactRef>, Status> {
        Err(Status::unimplemented("stat"))
    }

    async fn list(
        &self,
        _r: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        Err(Status::unimplemented("list"))
    }
}
