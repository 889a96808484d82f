//! The DERP map served at `/derpmap.json`: Tailscale's DERPMap JSON (the
//! shape headscale's `derp.urls` consumes), built from a regions file in
//! JSON or TOML with the same keys (`Regions`, `RegionID`, `HostName`, …).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &i64) -> bool {
    *n == 0
}
fn is_zero_f(n: &f64) -> bool {
    *n == 0.0
}

/// A DERPMap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DerpMap {
    /// Home-region scoring; omitted when absent.
    #[serde(
        rename = "HomeParams",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub home_params: Option<HomeParams>,
    /// Regions by ID (decimal string keys in JSON). Never omitted.
    #[serde(rename = "Regions")]
    pub regions: BTreeMap<i64, DerpRegion>,
    /// "Do not use Tailscale's default regions."
    #[serde(
        rename = "omitDefaultRegions",
        default,
        skip_serializing_if = "is_false"
    )]
    pub omit_default_regions: bool,
}

/// `DERPHomeParams`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HomeParams {
    /// Latency multipliers by region ID.
    #[serde(
        rename = "RegionScore",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub region_score: Option<BTreeMap<i64, f64>>,
}

/// `DERPRegion`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DerpRegion {
    /// Region ID (900–999 for self-hosted regions).
    #[serde(rename = "RegionID")]
    pub region_id: i64,
    /// Short code.
    #[serde(rename = "RegionCode")]
    pub region_code: String,
    /// Long name.
    #[serde(rename = "RegionName")]
    pub region_name: String,
    /// Degrees.
    #[serde(rename = "Latitude", default, skip_serializing_if = "is_zero_f")]
    pub latitude: f64,
    /// Degrees.
    #[serde(rename = "Longitude", default, skip_serializing_if = "is_zero_f")]
    pub longitude: f64,
    /// Deprecated.
    #[serde(rename = "Avoid", default, skip_serializing_if = "is_false")]
    pub avoid: bool,
    /// Never measured nor chosen as home.
    #[serde(rename = "NoMeasureNoHome", default, skip_serializing_if = "is_false")]
    pub no_measure_no_home: bool,
    /// Nodes, in preference order.
    #[serde(rename = "Nodes")]
    pub nodes: Vec<DerpNode>,
}

/// `DERPNode`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DerpNode {
    /// Unique across the map.
    #[serde(rename = "Name")]
    pub name: String,
    /// The containing region.
    #[serde(rename = "RegionID")]
    pub region_id: i64,
    /// Dial/SNI name.
    #[serde(rename = "HostName")]
    pub host_name: String,
    /// Name to verify instead of HostName (or `sha256-raw:<hex>`).
    #[serde(rename = "CertName", default, skip_serializing_if = "String::is_empty")]
    pub cert_name: String,
    /// Fixed IPv4, or `none`.
    #[serde(rename = "IPv4", default, skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    /// Fixed IPv6, or `none`.
    #[serde(rename = "IPv6", default, skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    /// 0 = 3478; negative = no STUN.
    #[serde(rename = "STUNPort", default, skip_serializing_if = "is_zero")]
    pub stun_port: i64,
    /// STUN only.
    #[serde(rename = "STUNOnly", default, skip_serializing_if = "is_false")]
    pub stun_only: bool,
    /// TLS port; 0 = 443.
    #[serde(rename = "DERPPort", default, skip_serializing_if = "is_zero")]
    pub derp_port: i64,
    /// Tests only.
    #[serde(rename = "InsecureForTests", default, skip_serializing_if = "is_false")]
    pub insecure_for_tests: bool,
    /// Tests only.
    #[serde(
        rename = "STUNTestIP",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub stun_test_ip: String,
    /// Answers `/generate_204` on port 80.
    #[serde(rename = "CanPort80", default, skip_serializing_if = "is_false")]
    pub can_port80: bool,
}

/// The file form: region keys are strings (TOML has no integer keys) and a
/// `null` region (JSON) is dropped, as headscale's docs describe.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMap {
    #[serde(rename = "HomeParams", default)]
    home_params: Option<HomeParams>,
    #[serde(rename = "Regions")]
    regions: BTreeMap<String, Option<DerpRegion>>,
    #[serde(rename = "omitDefaultRegions", default)]
    omit_default_regions: bool,
}

impl DerpMap {
    /// Reads a regions file: `.toml` as TOML, anything else as JSON.
    pub fn load(path: &Path) -> Result<DerpMap, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let is_toml = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        DerpMap::parse(&text, is_toml)
    }

    /// Parses and validates a regions file's text, as TOML or as JSON.
    pub fn parse(text: &str, is_toml: bool) -> Result<DerpMap, String> {
        let file: FileMap = if is_toml {
            toml::from_str(text).map_err(|e| e.to_string())?
        } else {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        };
        let mut regions = BTreeMap::new();
        for (k, r) in file.regions {
            let id: i64 = k
                .trim()
                .parse()
                .map_err(|_| format!("region key {k:?} is not a number"))?;
            if let Some(r) = r {
                regions.insert(id, r);
            }
        }
        let m = DerpMap {
            home_params: file.home_params,
            regions,
            omit_default_regions: file.omit_default_regions,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks IDs, names and required fields.
    pub fn validate(&self) -> Result<(), String> {
        if self.regions.is_empty() {
            return Err("no regions".into());
        }
        let mut names = HashSet::new();
        for (&id, r) in &self.regions {
            if id <= 0 || id > (1i64 << 53) - 1 {
                return Err(format!(
                    "region {id}: RegionID must be between 1 and 2^53-1"
                ));
            }
            if r.region_id != id {
                return Err(format!(
                    "region {id}: RegionID {} differs from its key",
                    r.region_id
                ));
            }
            if r.nodes.is_empty() {
                return Err(format!("region {id}: no Nodes"));
            }
            for n in &r.nodes {
                if n.name.is_empty() || !names.insert(n.name.clone()) {
                    return Err(format!(
                        "region {id}: node Name {:?} is empty or not unique",
                        n.name
                    ));
                }
                if n.region_id != id {
                    return Err(format!(
                        "node {}: RegionID {} is not its region {id}",
                        n.name, n.region_id
                    ));
                }
                if n.host_name.is_empty() {
                    return Err(format!("node {}: HostName is required", n.name));
                }
            }
        }
        Ok(())
    }

    /// The JSON served at `/derpmap.json`.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("DERP map serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_toml_files_give_the_same_map() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("regions.json");
        std::fs::write(
            &json,
            r#"{"Regions":{"900":{"RegionID":900,"RegionCode":"home","RegionName":"Home relay",
               "Nodes":[{"Name":"900a","RegionID":900,"HostName":"derp.example.com","IPv4":"198.51.100.1","CanPort80":true,"STUNPort":-1}]},
               "1":null}}"#,
        )
        .unwrap();
        let toml = dir.path().join("regions.toml");
        std::fs::write(
            &toml,
            "[Regions.900]\nRegionID = 900\nRegionCode = \"home\"\nRegionName = \"Home relay\"\n\
             [[Regions.900.Nodes]]\nName = \"900a\"\nRegionID = 900\nHostName = \"derp.example.com\"\n\
             IPv4 = \"198.51.100.1\"\nCanPort80 = true\nSTUNPort = -1\n",
        )
        .unwrap();
        let a = DerpMap::load(&json).unwrap();
        let b = DerpMap::load(&toml).unwrap();
        assert_eq!(a, b);
        let out = String::from_utf8(a.to_json()).unwrap();
        assert_eq!(
            out,
            r#"{"Regions":{"900":{"RegionID":900,"RegionCode":"home","RegionName":"Home relay","Nodes":[{"Name":"900a","RegionID":900,"HostName":"derp.example.com","IPv4":"198.51.100.1","STUNPort":-1,"CanPort80":true}]}}}"#
        );
    }

    #[test]
    fn bad_maps_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        for bad in [
            r#"{"Regions":{}}"#,
            r#"{"Regions":{"900":{"RegionID":901,"RegionCode":"a","RegionName":"a","Nodes":[{"Name":"a","RegionID":900,"HostName":"h"}]}}}"#,
            r#"{"Regions":{"900":{"RegionID":900,"RegionCode":"a","RegionName":"a","Nodes":[{"Name":"a","RegionID":900,"HostName":""}]}}}"#,
            r#"{"Regions":{"x":{"RegionID":900,"RegionCode":"a","RegionName":"a","Nodes":[]}}}"#,
            r#"{"Regionz":{}}"#,
        ] {
            std::fs::write(&p, bad).unwrap();
            assert!(DerpMap::load(&p).is_err(), "{bad}");
        }
    }
}
