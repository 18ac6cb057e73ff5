//! The crate's one error type. `category()` is stable: it labels metrics and
//! `reason()` becomes the Ready condition's reason and the Event reason.
//! No variant carries a plaintext key.

/// Everything that can go wrong in keyward.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key database could not be reached or refused a query.
    #[error("key database error: {0}")]
    Database(#[from] sqlx::Error),

    /// A commit failed on the way: it may or may not have landed. Batches that
    /// add (usage counts) are not written again, so nothing is counted twice.
    #[error("key database commit outcome unknown: {0}")]
    UncertainCommit(#[source] sqlx::Error),
    /// Applying the embedded schema migrations failed.
    #[error("key database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// A Kubernetes API call failed. The message keeps the HTTP code and reason
    /// only: status and Events should stay short, and a server message could be long.
    #[error("Kubernetes API error: {}", kube_summary(.0))]
    Kube(#[from] kube::Error),

    /// The target Secret changed between reading it and writing the new key; the
    /// key was revoked unused and the next reconcile reads the Secret again.
    #[error(
        "Secret {namespace}/{name} changed while a key was being written; will re-read and retry"
    )]
    SecretChanged {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        name: String,
    },

    /// Writing the key's Secret failed. Only the status code and reason are kept,
    /// because the API server's message could quote the request body.
    #[error("writing Secret {namespace}/{name} failed: HTTP {code} {reason}")]
    SecretWrite {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        name: String,
        /// HTTP status code from the API server, 0 when no response came.
        code: u16,
        /// The API server's machine-readable reason, or the transport error kind.
        reason: String,
    },

    /// Adding or removing the finalizer, or the wrapped reconcile, failed.
    #[error("{}", finalizer_summary(.0))]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),

    /// A key record was not in the state a step expected (another writer got there first).
    #[error("key {key_id} is no longer {expected}; will re-read and retry")]
    StaleKeyState {
        /// The key record's id.
        key_id: String,
        /// The state the step needed.
        expected: &'static str,
    },

    /// The object lacks a field the API server always sets (name, namespace, uid).
    #[error("ApiKey is missing metadata.{0}")]
    MissingMetadata(&'static str),

    /// The OS random number generator failed.
    #[error("random number generator failed: {0}")]
    Entropy(String),

    /// Leader election failed, or this replica lost the lease.
    #[error("leader election: {0}")]
    Leadership(String),

    /// The ApiKeyPolicies or namespace labels are not known yet, so a key cannot
    /// be checked against them; nothing is issued until they are.
    #[error("ApiKeyPolicy check not possible yet: {0}; will retry")]
    PolicyUnavailable(String),

    /// Bad flags or settings.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// Serializing a manifest failed.
    #[error("serialization failed: {0}")]
    Serialize(String),
}

impl Error {
    /// A stable, low-cardinality label for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Database(_) | Error::UncertainCommit(_) | Error::Migrate(_) => "database",
            Error::Kube(_) | Error::SecretWrite { .. } => "kubernetes",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.category(),
                _ => "kubernetes",
            },
            Error::StaleKeyState { .. } | Error::SecretChanged { .. } => "conflict",
            Error::MissingMetadata(_) => "invalid_object",
            Error::Entropy(_) => "entropy",
            Error::Config(_) => "config",
            Error::PolicyUnavailable(_) => "policy",
            Error::Leadership(_) => "leadership",
            Error::Serialize(_) => "serialize",
        }
    }

    /// The PascalCase reason shown in the Ready condition and in Events.
    pub fn reason(&self) -> &'static str {
        match self.category() {
            "database" => "DatabaseUnavailable",
            "kubernetes" => "KubernetesApiError",
            "conflict" => "ConcurrentUpdate",
            "invalid_object" => "InvalidObject",
            "policy" => "PolicyUnavailable",
            _ => "InternalError",
        }
    }
}

/// A short, body-free description of a Kubernetes client error.
fn kube_summary(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("HTTP {} {}", status.code, status.reason),
        other => other.to_string(),
    }
}

/// The finalizer helper's error, with Kubernetes errors kept short.
fn finalizer_summary(error: &kube::runtime::finalizer::Error<Error>) -> String {
    use kube::runtime::finalizer::Error as F;
    match error {
        F::ApplyFailed(e) | F::CleanupFailed(e) => e.to_string(),
        F::AddFinalizer(e) => format!("adding the finalizer failed: {}", kube_summary(e)),
        F::RemoveFinalizer(e) => format!("removing the finalizer failed: {}", kube_summary(e)),
        other => other.to_string(),
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    #[test]
    fn kubernetes_errors_are_short_in_status_and_events() {
        let status = Status::failure(&"x".repeat(2_000), "Conflict").with_code(409);
        let error = Error::Kube(kube::Error::Api(Box::new(status)));
        assert_eq!(error.to_string(), "Kubernetes API error: HTTP 409 Conflict");
        let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::AddFinalizer(
            kube::Error::Api(Box::new(
                Status::failure("the object has been modified", "Conflict").with_code(409),
            )),
        )));
        assert_eq!(
            wrapped.to_string(),
            "adding the finalizer failed: HTTP 409 Conflict"
        );
        assert_eq!(wrapped.reason(), "KubernetesApiError");
    }
}
