//! Field-level JSON Schemas of the proto messages for the OpenAPI document, derived from
//! the protocol's own file descriptor set ([`scabbard_common::proto::FILE_DESCRIPTOR_SET`],
//! the one server reflection serves), so they follow the proto files without a second
//! copy. They describe the proto3 JSON mapping the API speaks: lowerCamelCase field names,
//! enums by value name, 64-bit integers as strings, bytes as base64, maps as objects,
//! nested messages as `$ref`s to their own schema (`Task`, `Task.Nested`, ...), and the
//! comments of the proto files as descriptions.

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type as FType};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr};

/// The package whose messages become schemas.
const PACKAGE: &str = "scabbard.v1";

/// Every message of the package (nested ones as `Outer.Inner`, map entries left out) as
/// a schema, by name.
pub(crate) fn all() -> BTreeMap<String, RefOr<Schema>> {
    let set =
        FileDescriptorSet::decode(scabbard_common::proto::FILE_DESCRIPTOR_SET).unwrap_or_default();
    let mut index = Index::default();
    for f in set.file.iter().filter(|f| f.package() == PACKAGE) {
        for e in &f.enum_type {
            index.add_enum(&format!(".{PACKAGE}.{}", e.name()), e);
        }
        for m in &f.message_type {
            index.add_message(&format!(".{PACKAGE}"), m);
        }
    }
    let mut out = BTreeMap::new();
    for f in set.file.iter().filter(|f| f.package() == PACKAGE) {
        let comments = comments_of(f);
        for (i, m) in f.message_type.iter().enumerate() {
            index.schemas(
                &format!(".{PACKAGE}"),
                m,
                &comments,
                &[4, i as i32],
                &mut out,
            );
        }
    }
    out
}

/// Leading comments by source path.
fn comments_of(f: &prost_types::FileDescriptorProto) -> HashMap<Vec<i32>, String> {
    f.source_code_info
        .iter()
        .flat_map(|s| s.location.iter())
        .filter_map(|l| {
            let c = l.leading_comments().trim();
            (!c.is_empty()).then(|| (l.path.clone(), c.replace("\n ", "\n")))
        })
        .collect()
}

#[derive(Default)]
struct Index {
    /// `.pkg.Enum` → value names.
    enums: HashMap<String, Vec<String>>,
    /// `.pkg.Msg.FooEntry` → the map entry's value field.
    maps: HashMap<String, FieldDescriptorProto>,
}

impl Index {
    fn add_enum(&mut self, full: &str, e: &prost_types::EnumDescriptorProto) {
        let values = e.value.iter().map(|v| v.name().to_string()).collect();
        self.enums.insert(full.to_string(), values);
    }

    fn add_message(&mut self, scope: &str, m: &DescriptorProto) {
        let full = format!("{scope}.{}", m.name());
        if m.options.as_ref().is_some_and(|o| o.map_entry()) {
            if let Some(v) = m.field.iter().find(|f| f.number() == 2) {
                self.maps.insert(full.clone(), v.clone());
            }
            return;
        }
        for e in &m.enum_type {
            self.add_enum(&format!("{full}.{}", e.name()), e);
        }
        for n in &m.nested_type {
            self.add_message(&full, n);
        }
    }

    /// Adds the schema of `m` (and of its nested messages) to `out`.
    fn schemas(
        &self,
        scope: &str,
        m: &DescriptorProto,
        comments: &HashMap<Vec<i32>, String>,
        path: &[i32],
        out: &mut BTreeMap<String, RefOr<Schema>>,
    ) {
        let full = format!("{scope}.{}", m.name());
        if m.options.as_ref().is_some_and(|o| o.map_entry()) {
            return;
        }
        let mut obj = ObjectBuilder::new().schema_type(Type::Object);
        let what = comments.get(path).cloned().unwrap_or_default();
        obj = obj.description(Some(
            format!("{} (proto3 JSON). {what}", &full[1..])
                .trim()
                .to_string(),
        ));
        for (i, f) in m.field.iter().enumerate() {
            let mut p = path.to_vec();
            p.extend([2, i as i32]);
            let mut schema = self.field(f);
            if let (Some(c), RefOr::T(Schema::Object(o))) = (comments.get(&p), &mut schema) {
                o.description = Some(c.clone());
            }
            obj = obj.property(json_name(f.name()), schema);
        }
        out.insert(name_of(&full), RefOr::T(Schema::Object(obj.build())));
        for (i, n) in m.nested_type.iter().enumerate() {
            let mut p = path.to_vec();
            p.extend([3, i as i32]);
            self.schemas(&full, n, comments, &p, out);
        }
    }

    fn field(&self, f: &FieldDescriptorProto) -> RefOr<Schema> {
        if f.r#type() == FType::Message
            && let Some(v) = self.maps.get(f.type_name())
        {
            return RefOr::T(Schema::Object(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .additional_properties(Some(self.single(v)))
                    .build(),
            ));
        }
        let one = self.single(f);
        if f.label() == Label::Repeated {
            return RefOr::T(Schema::Array(ArrayBuilder::new().items(one).build()));
        }
        one
    }

    /// The schema of one value of `f`.
    fn single(&self, f: &FieldDescriptorProto) -> RefOr<Schema> {
        let t = |ty: Type| ObjectBuilder::new().schema_type(ty);
        let b =
            match f.r#type() {
                FType::Double | FType::Float => t(Type::Number),
                FType::Int32 | FType::Sint32 | FType::Sfixed32 => t(Type::Integer).format(Some(
                    utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Int32),
                )),
                FType::Uint32 | FType::Fixed32 => t(Type::Integer).minimum(Some(0)),
                FType::Int64 | FType::Sint64 | FType::Sfixed64 => t(Type::String)
                    .format(Some(utoipa::openapi::SchemaFormat::Custom("int64".into()))),
                FType::Uint64 | FType::Fixed64 => t(Type::String)
                    .format(Some(utoipa::openapi::SchemaFormat::Custom("uint64".into()))),
                FType::Bool => t(Type::Boolean),
                FType::String => t(Type::String),
                FType::Bytes => t(Type::String).content_encoding("base64"),
                FType::Enum => {
                    let values = self.enums.get(f.type_name()).cloned().unwrap_or_default();
                    t(Type::String).enum_values(Some(values))
                }
                FType::Message | FType::Group => {
                    let name = f.type_name();
                    if name.starts_with(&format!(".{PACKAGE}.")) {
                        return RefOr::Ref(Ref::from_schema_name(name_of(name)));
                    }
                    // Well-known types outside the package: any JSON value.
                    ObjectBuilder::new().description(Some(name.trim_start_matches('.')))
                }
            };
        RefOr::T(Schema::Object(b.build()))
    }
}

/// `.scabbard.v1.Task.Nested` → `Task.Nested`.
fn name_of(full: &str) -> String {
    full.trim_start_matches('.')
        .strip_prefix(PACKAGE)
        .map_or(full, |s| s.trim_start_matches('.'))
        .to_string()
}

/// The proto3 JSON name of a field: lowerCamelCase.
fn json_name(proto: &str) -> String {
    let mut out = String::with_capacity(proto.len());
    let mut upper = false;
    for c in proto.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_their_fields() {
        let all = all();
        let task = serde_json::to_value(&all["Task"]).expect("json");
        let props = &task["properties"];
        assert_eq!(props["id"]["type"], "string", "{task}");
        assert_eq!(
            props["state"]["enum"][0], "TASK_STATE_UNSPECIFIED",
            "{task}"
        );
        assert_eq!(props["createdAtMs"]["type"], "string", "{task}");
        let submit = serde_json::to_value(&all["SubmitTaskRequest"]).expect("json");
        assert_eq!(
            submit["properties"]["spec"]["$ref"], "#/components/schemas/TaskSpec",
            "{submit}"
        );
        let spec = serde_json::to_value(&all["TaskSpec"]).expect("json");
        assert_eq!(
            spec["properties"]["labels"]["additionalProperties"]["type"], "string",
            "{spec}"
        );
        assert!(
            !all.keys().any(|k| k.contains('.') && k.ends_with("Entry")),
            "map entries left out"
        );
        assert_eq!(json_name("after_task_id"), "afterTaskId");
    }
}
