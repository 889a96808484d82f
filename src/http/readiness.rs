//! `/readyz`: whether this relay should receive clients, and why not, plus
//! what an operator wants to see at a glance (headscale, the cache, mesh
//! links).
//!
//! Readiness rules: the relay is ready unless `--verify-clients headscale`
//! is on and no node snapshot was ever loaded (from the state directory,
//! headscale or a peer relay): such a relay would refuse every client.
//! A failing headscale, an old cache or mesh links that are down are
//! reported but do not make the relay unready: taking it out of service
//! would only move the same clients to relays in the same situation.

use crate::mesh::LinkState;

/// One mesh link as `/readyz` reports it: peer, state, last failure.
pub type LinkLine = (String, LinkState, Option<String>);

/// The status (ready or not) and the plain-text body.
pub fn report(companion: Option<(bool, Vec<String>)>, links: &[LinkLine]) -> (bool, String) {
    let (ready, details) = companion.unwrap_or((true, Vec::new()));
    let mut body = String::from(if ready {
        "ready\n"
    } else {
        "not ready: no headscale snapshot loaded yet\n"
    });
    for l in details {
        body.push_str(&l);
        body.push('\n');
    }
    for (peer, state, error) in links {
        body.push_str(&format!("mesh {peer}: {}", state.as_str()));
        if *state != LinkState::Up {
            if let Some(e) = error {
                body.push_str(&format!(" (last error: {e})"));
            }
        }
        body.push('\n');
    }
    (ready, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_down_are_reported_but_do_not_make_the_relay_unready() {
        let links = vec![
            ("derp2.example.com".to_owned(), LinkState::Up, None),
            (
                "derp3.example.com".to_owned(),
                LinkState::Down,
                Some("connect 192.0.2.3:443: Connection refused".to_owned()),
            ),
        ];
        let (ready, body) = report(None, &links);
        assert!(ready);
        assert_eq!(
            body,
            "ready\nmesh derp2.example.com: up\n\
             mesh derp3.example.com: down (last error: connect 192.0.2.3:443: Connection refused)\n"
        );
    }

    #[test]
    fn an_empty_cache_under_verify_clients_is_not_ready() {
        let (ready, body) = report(
            Some((
                false,
                vec!["cache: no headscale snapshot loaded yet".into()],
            )),
            &[],
        );
        assert!(!ready);
        assert!(body.starts_with("not ready: "), "{body}");
        assert!(body.contains("\ncache: no headscale snapshot"), "{body}");
    }
}
