//! Resolving the mesh flags (`--mesh-with`, `--mesh-ca-file`) into the
//! mesh's own [`MeshSettings`].

use super::{ConfigError, Settings};
use crate::mesh::{MeshSettings, PeerSpec};

impl MeshSettings {
    /// Reads and checks the mesh flags.
    pub fn resolve(s: &Settings) -> Result<MeshSettings, ConfigError> {
        let invalid = |key, message| ConfigError::Invalid { key, message };
        let peers = PeerSpec::parse_list(s.mesh_with.as_deref().unwrap_or(""))
            .map_err(|m| invalid("mesh-with", m))?;
        if !peers.is_empty() && s.mesh_psk_file.is_none() {
            return Err(invalid(
                "mesh-with",
                "meshing requires a mesh key: set --mesh-psk-file".into(),
            ));
        }
        if let Some(p) = &s.mesh_ca_file {
            crate::mesh::dial::tls_config(Some(p)).map_err(|m| invalid("mesh-ca-file", m))?;
        }
        Ok(MeshSettings {
            peers,
            ca_file: s.mesh_ca_file.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_with_needs_a_mesh_key() {
        let mut s = Settings {
            mesh_with: Some("derp1.example.com,derp2.example.com/10.0.0.2".into()),
            ..Default::default()
        };
        let e = MeshSettings::resolve(&s).unwrap_err().to_string();
        assert!(e.starts_with("mesh-with:"), "{e}");
        s.mesh_psk_file = Some("/nonexistent".into());
        assert_eq!(MeshSettings::resolve(&s).unwrap().peers.len(), 2);
        s.mesh_with = Some("host:xx".into());
        assert!(MeshSettings::resolve(&s).is_err());
    }
}
