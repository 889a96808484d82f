//! The TLS settings of the main listener: the certificate mode and where
//! certificates come from. Filled in by the top level from flags and TOML.

use std::path::PathBuf;

use serde::Deserialize;

/// How the main listener gets its TLS certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CertMode {
    /// Plain HTTP, no TLS.
    None,
    /// `<certdir>/<hostname>.crt` and `.key`, reloaded when they change.
    Manual,
    /// ACME (Let's Encrypt or any `--acme-directory`).
    Letsencrypt,
    /// A self-signed certificate made at start (labs and tests).
    SelfSigned,
}

/// TLS settings of the main listener.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Certificate mode (never `None` here).
    pub mode: CertMode,
    /// Certificate directory / ACME cache.
    pub certdir: PathBuf,
    /// ACME directory URL.
    pub acme_directory: String,
    /// ACME contact.
    pub acme_email: Option<String>,
    /// Extra trusted roots for talking to the ACME directory.
    pub acme_ca_file: Option<PathBuf>,
}
