//! Resolving the companion's flags/TOML keys into the companion's own
//! [`CompanionConfig`].

use std::time::Duration;

use super::{parse_duration, ConfigError, Settings};
use crate::companion::admission::{Policy, UrlConfig};
use crate::companion::derpmap::DerpMap;
use crate::companion::{CompanionConfig, HeadscaleSource};

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Checks that `s` is an absolute `http://` or `https://` URL.
fn check_url(key: &'static str, s: &str) -> Result<String, ConfigError> {
    let uri: hyper::Uri = s
        .trim()
        .parse()
        .map_err(|e| invalid(key, format!("{s:?} is not a URL ({e})")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(s.trim().to_owned()),
        _ => Err(invalid(
            key,
            format!("{s:?} must be an http:// or https:// URL"),
        )),
    }
}

/// Without `companion-peers`, the mesh peers (`--mesh-with`) are asked for
/// snapshots, at `scheme://host:port` of each entry.
fn mesh_peers(s: &Settings) -> Vec<String> {
    crate::mesh::dial::PeerSpec::parse_list(s.mesh_with.as_deref().unwrap_or(""))
        .unwrap_or_default()
        .iter()
        .map(|p| p.url().trim_end_matches("/derp").to_owned())
        .collect()
}

/// The companion settings; `None` when no companion key is set.
pub fn resolve(s: &Settings) -> Result<Option<CompanionConfig>, ConfigError> {
    if let Some(p) = &s.headscale_ca_file {
        crate::trust::roots(Some(p)).map_err(|e| invalid("headscale-ca-file", e.to_string()))?;
    }
    let mut shrink = crate::companion::shrink::ShrinkPolicy::default();
    if let Some(f) = s.headscale_max_shrink {
        if !(0.0..=1.0).contains(&f) {
            return Err(invalid(
                "headscale-max-shrink",
                format!("{f} must be a fraction from 0 to 1 (1 turns the guard off)"),
            ));
        }
        shrink.max_fraction = f;
    }
    if let Some(d) = &s.headscale_shrink_confirm {
        shrink.confirm_after = parse_duration("headscale-shrink-confirm", d)?;
    }
    let verify_clients = match s.verify_clients.as_deref().map(str::trim) {
        None | Some("" | "false" | "none" | "off") => false,
        Some("headscale") => true,
        Some(other) => {
            return Err(invalid(
                "verify-clients",
                format!(
                    "{other:?}: only \"headscale\" is supported (derper's local-tailscaled check is not); \"false\" disables"
                ),
            ))
        }
    };
    let headscale = match (&s.headscale_url, &s.headscale_api_key_file) {
        (Some(url), Some(f)) => Some(HeadscaleSource {
            url: check_url("headscale-url", url)?,
            api_key_file: f.clone(),
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                "headscale-api-key-file",
                "is required with headscale-url",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "headscale-url",
                "is required with headscale-api-key-file",
            ))
        }
    };
    let mut peers = s
        .companion_peers
        .iter()
        .flatten()
        .filter(|p| !p.trim().is_empty())
        .map(|p| check_url("companion-peers", p))
        .collect::<Result<Vec<_>, _>>()?;
    if s.companion_peers.is_none() && (headscale.is_some() || verify_clients) {
        peers = mesh_peers(s);
    }
    let dur = |key, v: &Option<String>, default: &str| {
        parse_duration(key, v.as_deref().unwrap_or(default))
    };
    let poll_interval = dur("headscale-poll-interval", &s.headscale_poll_interval, "10s")?;
    if poll_interval.is_zero() {
        return Err(invalid("headscale-poll-interval", "must be greater than 0"));
    }
    let request_timeout = dur("headscale-timeout", &s.headscale_timeout, "5s")?;
    if request_timeout.is_zero() {
        return Err(invalid("headscale-timeout", "must be greater than 0"));
    }
    let verify_url = match &s.verify_client_url {
        Some(u) => Some(UrlConfig {
            url: check_url("verify-client-url", u)?,
            fail_open: s.verify_client_url_fail_open.unwrap_or(true),
            timeout: Duration::from_secs(5),
            cache_ttl: dur("verify-client-url-cache", &s.verify_client_url_cache, "0")?,
        }),
        None => None,
    };
    let derp_map = match &s.derp_map_file {
        Some(p) => Some(
            DerpMap::load(p)
                .map_err(|e| invalid("derp-map-file", format!("{}: {e}", p.display())))?,
        ),
        None => None,
    };
    let allow_users: Vec<String> = s
        .allow_users
        .iter()
        .flatten()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    let allow_tags: Vec<String> = s
        .allow_tags
        .iter()
        .flatten()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if !verify_clients {
        for (key, set) in [
            ("allow-users", !allow_users.is_empty()),
            ("allow-tags", !allow_tags.is_empty()),
            ("admission-when-empty", s.admission_when_empty.is_some()),
        ] {
            if set {
                return Err(invalid(
                    key,
                    "only applies with verify-clients = \"headscale\"",
                ));
            }
        }
    }
    if verify_clients && headscale.is_none() && peers.is_empty() {
        return Err(invalid(
            "verify-clients",
            "\"headscale\" needs headscale-url (and headscale-api-key-file) or companion-peers",
        ));
    }
    if headscale.is_none()
        && peers.is_empty()
        && !verify_clients
        && verify_url.is_none()
        && derp_map.is_none()
    {
        return Ok(None);
    }
    let state_dir = match (&s.state_dir, s.is_dev()) {
        (Some(d), _) => Some(d.clone()),
        (None, true) => None,
        (None, false) => Some(super::default_state_dir()),
    };
    Ok(Some(CompanionConfig {
        headscale,
        poll_interval,
        request_timeout,
        state_dir,
        peers,
        verify_clients,
        policy: Policy {
            allow_users,
            allow_tags,
            when_empty: s.admission_when_empty.unwrap_or_default(),
        },
        verify_url,
        derp_map,
        headscale_ca_file: s.headscale_ca_file.clone(),
        shrink,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::companion::admission::WhenEmpty;

    fn toml(s: &str) -> Settings {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn no_companion_keys_no_companion() {
        assert!(resolve(&Settings::default()).unwrap().is_none());
    }

    #[test]
    fn toml_keys_and_defaults() {
        let c = resolve(&toml(
            "headscale-url = \"https://hs.example.com\"\nheadscale-api-key-file = \"/k\"\nverify-clients = \"headscale\"\n\
             allow-users = [\"proj-a\"]\nadmission-when-empty = \"allow\"\ncompanion-peers = [\"https://derp2.example.com\"]\n\
             state-dir = \"/tmp/x\"\n",
        ))
        .unwrap()
        .unwrap();
        assert!(c.verify_clients);
        assert_eq!(c.poll_interval, Duration::from_secs(10));
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        assert_eq!(c.policy.allow_users, vec!["proj-a".to_string()]);
        assert_eq!(c.policy.when_empty, WhenEmpty::Allow);
        assert_eq!(c.peers, vec!["https://derp2.example.com".to_string()]);
        assert_eq!(c.state_dir.as_deref(), Some(std::path::Path::new("/tmp/x")));
        assert!(c.verify_url.is_none());
    }

    #[test]
    fn peers_default_to_the_mesh() {
        let base = "headscale-url = \"http://hs:8080\"\nheadscale-api-key-file = \"/k\"\nmesh-psk-file = \"/m\"\n";
        let mesh = "mesh-with = \"derp1.example.com,http://127.0.0.1:3341\"\n";
        let c = resolve(&toml(&format!("{base}{mesh}"))).unwrap().unwrap();
        assert_eq!(
            c.peers,
            ["https://derp1.example.com:443", "http://127.0.0.1:3341"]
        );
        let own = "companion-peers = [\"https://x.example.com\"]\n";
        let c = resolve(&toml(&format!("{base}{mesh}{own}")))
            .unwrap()
            .unwrap();
        assert_eq!(c.peers, ["https://x.example.com"]);
        // A mesh alone starts no companion.
        assert!(resolve(&toml(&format!("mesh-psk-file = \"/m\"\n{mesh}")))
            .unwrap()
            .is_none());
    }

    #[test]
    fn verify_client_url_defaults_to_fail_open() {
        let c = resolve(&toml("verify-client-url = \"http://127.0.0.1:9/verify\"\n"))
            .unwrap()
            .unwrap();
        let u = c.verify_url.unwrap();
        assert!(u.fail_open);
        assert_eq!(u.timeout, Duration::from_secs(5));
        assert!(u.cache_ttl.is_zero());
        assert!(!c.verify_clients);
    }

    #[test]
    fn errors_name_the_key() {
        for (t, key) in [
            ("verify-clients = \"true\"", "verify-clients:"),
            ("verify-clients = \"headscale\"", "verify-clients:"),
            ("headscale-url = \"https://x\"", "headscale-api-key-file:"),
            ("headscale-url = \"ftp://x\"\nheadscale-api-key-file = \"/k\"", "headscale-url:"),
            ("allow-tags = [\"tag:a\"]", "allow-tags:"),
            ("companion-peers = [\"nope\"]", "companion-peers:"),
            ("headscale-url = \"http://x\"\nheadscale-api-key-file = \"/k\"\nheadscale-poll-interval = \"0\"", "headscale-poll-interval:"),
            ("derp-map-file = \"/nonexistent/map.json\"", "derp-map-file:"),
        ] {
            let e = resolve(&toml(t)).unwrap_err().to_string();
            assert!(e.starts_with(key), "{t}: {e}");
        }
    }
}
