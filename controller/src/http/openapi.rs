//! The OpenAPI 3.1 document at `/api/v1/openapi.json`, built (with utoipa's builder API)
//! from the same route tables that build the router ([`super::routes::UNARY`],
//! [`super::sse::STREAMS`]), so it lists every route. Message bodies are described by
//! field-level schemas of the proto messages (the proto3 JSON mapping of
//! `scabbard.v1.<Name>`, derived from the descriptors in [`super::schemas`]); errors by the
//! `Error` schema.

use std::collections::BTreeSet;

use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, Paths};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ComponentsBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    Content, InfoBuilder, OpenApi, OpenApiBuilder, Ref, Required, ResponseBuilder,
};

use super::routes::UNARY;
use super::sse::STREAMS;

/// `GET /api/v1/openapi.json` (no token needed).
pub(crate) async fn document() -> Response {
    axum::Json(build()).into_response()
}

fn json(schema: &str) -> Content {
    Content::new(Some(Ref::from_schema_name(schema)))
}

fn path_param(name: &str, field: &str) -> utoipa::openapi::path::Parameter {
    ParameterBuilder::new()
        .name(name)
        .description(Some(format!("sets the request field {field}")))
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .build()
}

/// Query parameters documented per route (`METHOD path`): each sets the request field of
/// that JSON name (`label`/`param` fill the maps with KEY=VALUE; lists repeat).
const QUERY: &[(&str, &[&str])] = &[
    (
        "GET /api/v1/tasks",
        &[
            "states",
            "label",
            "project",
            "pageSize",
            "pageToken",
            "createdAfterMs",
            "createdBeforeMs",
        ],
    ),
    (
        "GET /api/v1/workflows",
        &["states", "project", "template", "pageSize", "pageToken"],
    ),
    ("GET /api/v1/templates/{name}", &["version"]),
    ("GET /api/v1/schedules", &["project"]),
    ("GET /api/v1/breakers", &["all"]),
    ("GET /api/v1/tokens", &["project", "kind", "includeRevoked"]),
    ("GET /api/v1/audit", &["limit", "project", "action"]),
    ("GET /api/v1/artifacts", &["taskId", "workflowId"]),
    (
        "GET /api/v1/events",
        &["ids", "sendInitial", "afterRevision", "afterTaskId"],
    ),
    ("GET /api/v1/workflows/{id}/events", &["afterRevision"]),
    (
        "GET /api/v1/tasks/{id}/logs",
        &["attempt", "fromSeq", "follow"],
    ),
];

fn query_params(method: &str, path: &str) -> Vec<utoipa::openapi::path::Parameter> {
    let key = format!("{method} {path}");
    QUERY
        .iter()
        .filter(|(k, _)| *k == key)
        .flat_map(|(_, names)| names.iter())
        .map(|name| {
            let list = matches!(*name, "states" | "ids" | "label");
            let item = ObjectBuilder::new().schema_type(Type::String);
            let mut b = ParameterBuilder::new()
                .name(*name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False);
            b = if list {
                b.schema(Some(
                    utoipa::openapi::schema::ArrayBuilder::new().items(item),
                ))
            } else {
                b.schema(Some(item))
            };
            b.build()
        })
        .collect()
}

fn params_of(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
}

fn errors(op: OperationBuilder) -> OperationBuilder {
    let mut op = op;
    for (code, what) in [
        (
            "400",
            "INVALID_ARGUMENT / FAILED_PRECONDITION / OUT_OF_RANGE",
        ),
        ("401", "UNAUTHENTICATED: missing or unknown token"),
        ("403", "PERMISSION_DENIED: scope or project"),
        ("404", "NOT_FOUND"),
        ("409", "ALREADY_EXISTS / ABORTED"),
        ("429", "RESOURCE_EXHAUSTED (Retry-After header)"),
        ("503", "UNAVAILABLE (no leader reachable)"),
    ] {
        op = op.response(
            code,
            ResponseBuilder::new()
                .description(what)
                .content("application/json", json("Error"))
                .build(),
        );
    }
    op
}

/// `GET /api/v1/artifacts/{id}/content`: bytes, not JSON.
fn download_operation() -> utoipa::openapi::path::Operation {
    let name = ParameterBuilder::new()
        .name("name")
        .description(Some("the artifact name, when {id} is a bare task id"))
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .build();
    let ok = ResponseBuilder::new()
        .description("The packed archive (tar + zstd); Content-Disposition: attachment")
        .content(
            "application/octet-stream",
            Content::new(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .content_media_type("application/octet-stream"),
            )),
        )
        .build();
    errors(
        OperationBuilder::new()
            .operation_id(Some("ArtifactService_Download"))
            .summary(Some(super::download::SUMMARY))
            .description(Some(
                "Calls gRPC ArtifactService/Download and streams the data parts as the body.",
            ))
            .tag("artifacts")
            .parameter(path_param(
                "id",
                "task_id and name (<task id>:<artifact name>)",
            ))
            .parameter(name)
            .response("200", ok),
    )
    .build()
}

/// The document.
pub(crate) fn build() -> OpenApi {
    let mut paths = Paths::new();
    let mut schemas = BTreeSet::new();
    for r in UNARY {
        schemas.insert(r.request);
        schemas.insert(r.response);
        let method = match r.method {
            "POST" => HttpMethod::Post,
            "PATCH" => HttpMethod::Patch,
            "DELETE" => HttpMethod::Delete,
            _ => HttpMethod::Get,
        };
        let rpc = r.rpc.trim_start_matches("/scabbard.v1.");
        let mut op = OperationBuilder::new()
            .operation_id(Some(rpc.replace('/', "_")))
            .summary(Some(r.summary))
            .description(Some(format!(
                "Calls gRPC {rpc} (request scabbard.v1.{}); query parameters set request fields by their JSON names.",
                r.request
            )))
            .tag(r.path.split('/').nth(3).unwrap_or("api").trim_end_matches(":batch"));
        for p in params_of(r.path) {
            let field = r
                .params
                .iter()
                .find(|(n, _)| *n == p)
                .map_or(p, |(_, f)| *f);
            op = op.parameter(path_param(p, field));
        }
        for q in query_params(r.method, r.path) {
            op = op.parameter(q);
        }
        if method != HttpMethod::Get {
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .description(Some(format!("scabbard.v1.{} (proto3 JSON)", r.request)))
                    .content("application/json", json(r.request))
                    .build(),
            ));
        }
        let op = errors(
            op.response(
                "200",
                ResponseBuilder::new()
                    .description(format!("scabbard.v1.{}", r.response))
                    .content("application/json", json(r.response))
                    .build(),
            ),
        );
        paths.add_path_operation(r.path, vec![method], op);
    }
    for s in STREAMS {
        schemas.insert(s.request);
        schemas.insert(s.event);
        let rpc = s.rpc.trim_start_matches("/scabbard.v1.");
        let mut op = OperationBuilder::new()
            .operation_id(Some(rpc.replace('/', "_")))
            .summary(Some(s.summary))
            .description(Some(format!(
                "Calls gRPC {rpc} (request scabbard.v1.{}); each event's data is a scabbard.v1.{} (proto3 JSON).",
                s.request, s.event
            )))
            .tag("events");
        for p in params_of(s.path) {
            op = op.parameter(path_param(p, p));
        }
        for q in query_params("GET", s.path) {
            op = op.parameter(q);
        }
        let mut ok = ResponseBuilder::new()
            .description(format!("text/event-stream of scabbard.v1.{}", s.event))
            .content(
                "text/event-stream",
                Content::new(Some(ObjectBuilder::new().schema_type(Type::String))),
            );
        if !s.sse {
            ok = ok.content("application/json", json(s.event));
        }
        paths.add_path_operation(
            s.path,
            vec![HttpMethod::Get],
            errors(op.response("200", ok.build())),
        );
    }
    paths.add_path_operation(
        super::download::PATH,
        vec![HttpMethod::Get],
        download_operation(),
    );
    let mut components = ComponentsBuilder::new()
        .security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        )
        .schema(
            "Error",
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .description(Some("A gRPC status as JSON"))
                .property(
                    "code",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .description(Some("gRPC code name, e.g. NOT_FOUND")),
                )
                .property("message", ObjectBuilder::new().schema_type(Type::String))
                .property(
                    "retryAfterMs",
                    ObjectBuilder::new().schema_type(Type::String),
                )
                .property("leader", ObjectBuilder::new().schema_type(Type::String))
                .required("code")
                .required("message"),
        );
    // Field-level schemas of every message (from the proto descriptors); a route's
    // message missing there still gets a described object.
    let generated = super::schemas::all();
    for s in schemas {
        if !generated.contains_key(s) {
            components = components.schema(
                s,
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .description(Some(format!(
                        "scabbard.v1.{s} in the proto3 JSON mapping; see proto/scabbard/v1."
                    ))),
            );
        }
    }
    for (name, schema) in generated {
        components = components.schema(name, schema);
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Scabbard HTTP API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "JSON over the same services as the gRPC API: the same bearer tokens, scopes, projects, limits and validation.",
                )),
        )
        .paths(paths)
        .components(Some(components.build()))
        .security(Some([SecurityRequirement::new("bearer", Vec::<String>::new())]))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_query_parameters_name_real_routes() {
        for (key, _) in QUERY {
            let known = UNARY
                .iter()
                .any(|r| format!("{} {}", r.method, r.path) == *key)
                || STREAMS.iter().any(|s| format!("GET {}", s.path) == *key);
            assert!(known, "{key} is not a route");
        }
        let doc = serde_json::to_value(build()).expect("json");
        let params = &doc["paths"]["/api/v1/tasks"]["get"]["parameters"];
        assert!(params.to_string().contains("pageToken"), "{params}");
    }
}
