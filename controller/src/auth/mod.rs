//! Security: who may call what. Owns token secrets ([`secrets`]), the authenticated caller
//! ([`principal`]), the cluster's tokens and projects as cached from the store
//! ([`catalog`]), and the tower layer that authenticates every gRPC call ([`layer`]).

pub mod catalog;
pub mod layer;
pub mod principal;
pub mod secrets;

pub use catalog::Catalog;
pub use layer::AuthLayer;
pub use principal::{ALL_PROJECTS, DEFAULT_PROJECT, Principal, principal};
pub use secrets::{bearer, constant_time_eq, new_agent_token, token_hash};
