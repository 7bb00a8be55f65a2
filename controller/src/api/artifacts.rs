//! `ArtifactService`: thin — converts messages and streams, calls [`Artifacts`].

use std::sync::Arc;

use futures::StreamExt;
use scabbard_common::Error;
use scabbard_common::proto::{
    ArtifactRef, DownloadArtifactRequest, DownloadArtifactResponse, ListArtifactsRequest,
    ListArtifactsResponse, StatArtifactRequest, UploadArtifactRequest,
    artifact_service_server::ArtifactService, download_artifact_response,
};
use tonic::{Request, Response, Status, Streaming};

use super::tasks::BoxStream;
use crate::artifacts::Artifacts;
use crate::auth;

/// Implementation of `scabbard.v1.ArtifactService`.
pub struct ArtifactApi {
    pub(crate) artifacts: Arc<Artifacts>,
}

#[tonic::async_trait]
impl ArtifactService for ArtifactApi {
    async fn upload(
        &self,
        req: Request<Streaming<UploadArtifactRequest>>,
    ) -> Result<Response<ArtifactRef>, Status> {
        let who = auth::principal(&req)?;
        let parts = req.into_inner().map(|m| match m {
            Ok(UploadArtifactRequest { part: Some(p) }) => Ok(p),
            Ok(UploadArtifactRequest { part: None }) => Err(Error::invalid(
                "an upload message holds neither header nor data",
            )),
            // The client went away or its stream broke.
            Err(s) => Err(Error::Unavailable(format!(
                "the client's stream failed ({:?}: {})",
                s.code(),
                s.message()
            ))),
        });
        Ok(Response::new(self.artifacts.upload(&who, parts).await?))
    }

    type DownloadStream = BoxStream<DownloadArtifactResponse>;

    async fn download(
        &self,
        req: Request<DownloadArtifactRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let who = auth::principal(&req)?;
        let (artifact, data) = self.artifacts.download(&who, req.into_inner()).await?;
        let first = DownloadArtifactResponse {
            part: Some(download_artifact_response::Part::Artifact(artifact)),
        };
        let rest = data.map(|d| {
            d.map(|b| DownloadArtifactResponse {
                part: Some(download_artifact_response::Part::Data(Vec::from(b))),
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(
            futures::stream::once(async { Ok(first) }).chain(rest),
        )))
    }

    async fn stat(
        &self,
        req: Request<StatArtifactRequest>,
    ) -> Result<Response<ArtifactRef>, Status> {
        let who = auth::principal(&req)?;
        Ok(Response::new(
            self.artifacts.stat(&who, req.into_inner()).await?,
        ))
    }

    async fn list(
        &self,
        req: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        let who = auth::principal(&req)?;
        Ok(Response::new(ListArtifactsResponse {
            artifacts: self.artifacts.list(&who, req.into_inner()).await?,
        }))
    }
}
