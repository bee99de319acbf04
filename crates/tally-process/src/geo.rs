//! `keen:ip_to_geo`: IP address to location, from MaxMind-format (`.mmdb`) databases.
//!
//! Two record layouts are understood, chosen by looking at the file's records:
//!
//! * MaxMind GeoIP2/GeoLite2 City: nested `city.names.en`, `subdivisions[0].names.en`,
//!   `country.{iso_code,names.en}`, `continent.names.en`, `postal.code`, `location.{latitude,longitude}`;
//! * DB-IP Lite City as published by ip-location-db: flat `city`, `state1`, `country_code`,
//!   `postcode`, `latitude`, `longitude` (no country or continent names, so those are omitted).
//!
//! The output is Keen's `{"city","province","country","country_code","continent","postal_code",
//! "coordinates":[lon,lat]}` with missing parts left out. Databases are read into memory once and
//! verified at start-up; [`GeoIp`] swaps in a replacement atomically while running.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use maxminddb::{Reader, WithinOptions};
use serde::Deserialize;

use crate::jsontext::ObjectWriter;

/// Why a database could not be used.
#[derive(Debug, thiserror::Error)]
#[error("GeoIP database {path}: {reason}")]
pub struct GeoError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// The record layout of a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// MaxMind GeoIP2 / GeoLite2 City.
    MaxMindCity,
    /// DB-IP Lite City, flat fields.
    DbIpFlat,
}

#[derive(Deserialize)]
struct Names<'a> {
    #[serde(borrow)]
    en: Option<&'a str>,
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(borrow)]
    names: Option<Names<'a>>,
}

#[derive(Deserialize)]
struct Country<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
    #[serde(borrow)]
    names: Option<Names<'a>>,
}

#[derive(Deserialize)]
struct Postal<'a> {
    #[serde(borrow)]
    code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Location {
    latitude: Option<f64>,
    longitude: Option<f64>,
}

/// The parts of a MaxMind City record Keen's output needs; everything else is skipped.
#[derive(Deserialize)]
struct MaxMindCity<'a> {
    #[serde(borrow)]
    city: Option<Named<'a>>,
    #[serde(borrow)]
    subdivisions: Option<Vec<Named<'a>>>,
    #[serde(borrow)]
    country: Option<Country<'a>>,
    #[serde(borrow)]
    continent: Option<Named<'a>>,
    #[serde(borrow)]
    postal: Option<Postal<'a>>,
    location: Option<Location>,
}

/// A DB-IP Lite City record.
#[derive(Deserialize)]
struct DbIpCity<'a> {
    #[serde(borrow)]
    city: Option<&'a str>,
    #[serde(borrow)]
    state1: Option<&'a str>,
    #[serde(borrow)]
    country_code: Option<&'a str>,
    #[serde(borrow)]
    postcode: Option<&'a str>,
    latitude: Option<f64>,
    longitude: Option<f64>,
}

/// Just the top-level keys of a record, to tell the layouts apart.
#[derive(Deserialize)]
struct Keys<'a> {
    #[serde(borrow, default)]
    country_code: Option<&'a str>,
    #[serde(default)]
    country: Option<serde::de::IgnoredAny>,
}

struct OneDatabase {
    path: PathBuf,
    reader: Reader<SharedBytes>,
    layout: Layout,
}

/// One or more opened, verified databases (DB-IP ships IPv4 and IPv6 as separate files); a
/// lookup asks each in turn.
pub struct GeoDatabase {
    databases: Vec<OneDatabase>,
    /// Identifies this opening to [`GeoRecordCache`]s (only this value holds the allocation, so
    /// its address names this opening while any cache's `Weak` to it lives).
    identity: Arc<()>,
}

/// One thread's memory of decoded records, by their place in the database. Many addresses share
/// one record (a city): on 200,000 random addresses of `gen_events.py`, DB-IP Lite City returns
/// 41,651 distinct records. A hit costs the tree walk and a hash lookup instead of decoding the
/// record and writing its JSON. Bounded; it forgets everything when full, and when the database
/// it remembers is replaced.
#[derive(Debug, Default)]
pub struct GeoRecordCache {
    /// The opening the records are from ([`GeoDatabase::identity`]).
    database: std::sync::Weak<()>,
    /// (database file, data-section offset) → location object.
    records: HashMap<(usize, usize), Arc<str>>,
}

impl GeoRecordCache {
    /// How many records one cache holds (each a location object's JSON text and its key).
    pub const CAPACITY: usize = 65_536;

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl std::fmt::Debug for GeoDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<_> = self.databases.iter().map(|d| (&d.path, d.layout)).collect();
        f.debug_struct("GeoDatabase").field("databases", &paths).finish()
    }
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq)]
pub enum GeoLookup {
    /// The location object for the event, as JSON text: written once here and copied into the
    /// event as it is (no tree built, serialised and dropped per event).
    Found(Arc<str>),
    /// The address is in no database.
    NotFound,
}

impl GeoDatabase {
    /// Opens and verifies every file; any damaged file is an error naming it.
    pub fn open(paths: &[PathBuf]) -> Result<Self, GeoError> {
        let databases = paths.iter().map(|p| open_one(p)).collect::<Result<_, _>>()?;
        Ok(Self {
            databases,
            identity: Arc::new(()),
        })
    }

    /// The databases' paths and layouts.
    pub fn layouts(&self) -> Vec<(PathBuf, Layout)> {
        self.databases
            .iter()
            .map(|d| (d.path.clone(), d.layout))
            .collect()
    }

    /// Looks `ip` up. A record that fails to decode counts as not found (and is logged); the
    /// files were verified at open, so that means damage after the fact.
    pub fn lookup(&self, ip: IpAddr) -> GeoLookup {
        self.lookup_with(ip, |_, db, result| decode_result(db, result))
    }

    /// [`GeoDatabase::lookup`] through a thread's record cache: the same answers, with each
    /// record decoded once while the cache remembers it.
    pub fn lookup_cached(&self, ip: IpAddr, cache: &mut GeoRecordCache) -> GeoLookup {
        if !std::ptr::eq(cache.database.as_ptr(), Arc::as_ptr(&self.identity)) {
            cache.records.clear();
            cache.database = Arc::downgrade(&self.identity);
        }
        self.lookup_with(ip, |index, db, result| {
            let Some(offset) = result.offset() else {
                return Ok(None);
            };
            if let Some(found) = cache.records.get(&(index, offset)) {
                return Ok(Some(found.clone()));
            }
            let found = decode_result(db, result)?;
            if let Some(found) = &found {
                if cache.records.len() >= GeoRecordCache::CAPACITY {
                    cache.records.clear();
                }
                cache.records.insert((index, offset), found.clone());
            }
            Ok(found)
        })
    }

    /// Asks each database in turn, turning what it found into the location object with `decode`
    /// (given the database's index, the database and the lookup's result).
    fn lookup_with(
        &self,
        ip: IpAddr,
        mut decode: impl FnMut(
            usize,
            &OneDatabase,
            &maxminddb::LookupResult<'_, SharedBytes>,
        ) -> Result<Option<Arc<str>>, maxminddb::MaxMindDbError>,
    ) -> GeoLookup {
        for (index, db) in self.databases.iter().enumerate() {
            if db.reader.metadata.ip_version == 4 && ip.is_ipv6() {
                continue;
            }
            match db.reader.lookup(ip).and_then(|result| decode(index, db, &result)) {
                Ok(Some(found)) => return GeoLookup::Found(found),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %db.path.display(), %ip, error = %e, "GeoIP record failed to decode")
                }
            }
        }
        GeoLookup::NotFound
    }
}

fn english<'a>(names: Option<Names<'a>>) -> Option<&'a str> {
    names.and_then(|n| n.en)
}

/// The location object of a found record, as JSON text; `None` if the result holds no data.
fn decode_result(
    db: &OneDatabase,
    result: &maxminddb::LookupResult<'_, SharedBytes>,
) -> Result<Option<Arc<str>>, maxminddb::MaxMindDbError> {
    if !result.has_data() {
        return Ok(None);
    }
    let mut out = ObjectWriter::new();
    let coordinates = match db.layout {
        Layout::MaxMindCity => {
            let Some(record) = result.decode::<MaxMindCity>()? else {
                return Ok(None);
            };
            out.string_if_any("city", record.city.and_then(|c| english(c.names)));
            out.string_if_any(
                "province",
                record
                    .subdivisions
                    .and_then(|s| s.into_iter().next())
                    .and_then(|s| english(s.names)),
            );
            let (code, name) = record
                .country
                .map_or((None, None), |c| (c.iso_code, english(c.names)));
            out.string_if_any("country", name);
            out.string_if_any("country_code", code);
            out.string_if_any("continent", record.continent.and_then(|c| english(c.names)));
            out.string_if_any("postal_code", record.postal.and_then(|p| p.code));
            record.location.map(|l| (l.longitude, l.latitude))
        }
        Layout::DbIpFlat => {
            let Some(record) = result.decode::<DbIpCity>()? else {
                return Ok(None);
            };
            out.string_if_any("city", record.city);
            out.string_if_any("province", record.state1);
            out.string_if_any("country_code", record.country_code);
            out.string_if_any("postal_code", record.postcode);
            Some((record.longitude, record.latitude))
        }
    };
    if let Some((Some(lon), Some(lat))) = coordinates {
        out.pair("coordinates", lon, lat);
    }
    Ok(Some(out.finish()))
}

fn open_one(path: &Path) -> Result<OneDatabase, GeoError> {
    let error = |reason: String| GeoError {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| error(format!("cannot read: {e}")))?;
    let metadata_start =
        find_metadata_start(&bytes).ok_or_else(|| error("no MaxMind DB metadata marker".into()))?;
    let bytes = SharedBytes(Arc::new(bytes));
    let reader =
        Reader::from_source(bytes.clone()).map_err(|e| error(format!("not a valid MaxMind DB: {e}")))?;
    check_sections(&reader, bytes.as_ref(), metadata_start).map_err(error)?;
    let layout = verify_and_detect(&reader).map_err(error)?;
    Ok(OneDatabase {
        path: path.to_path_buf(),
        reader,
        layout,
    })
}

const METADATA_MARKER: &[u8] = b"\xAB\xCD\xEFMaxMind.com";

fn find_metadata_start(bytes: &[u8]) -> Option<usize> {
    let at = bytes
        .windows(METADATA_MARKER.len())
        .rposition(|w| w == METADATA_MARKER)?;
    Some(at)
}

/// The file's sections must fit: the search tree (`node_count` nodes of two records), then 16
/// zero bytes, then the data section, all before the metadata. A wrong node count (one of
/// MaxMind's corrupt test files) breaks this, and would otherwise send a tree walk astray.
fn check_sections(reader: &Reader<SharedBytes>, buffer: &[u8], metadata_start: usize) -> Result<(), String> {
    let meta = &reader.metadata;
    if !matches!(meta.record_size, 24 | 28 | 32) {
        return Err(format!("unsupported record size {}", meta.record_size));
    }
    let tree_size = (meta.node_count as u64) * (meta.record_size as u64) / 4;
    let separator_end = tree_size + 16;
    if separator_end > metadata_start as u64 {
        return Err(format!(
            "node count {} does not fit the file (search tree would end at byte {tree_size}, metadata starts at {metadata_start})",
            meta.node_count
        ));
    }
    if buffer[tree_size as usize..separator_end as usize]
        .iter()
        .any(|b| *b != 0)
    {
        return Err(format!(
            "node count {} is wrong: the 16-byte data section separator is not where it should be",
            meta.node_count
        ));
    }
    Ok(())
}

/// The file's bytes, shared between the reader and the start-up checks.
#[derive(Clone)]
struct SharedBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// Walks every network in the database, decoding each record, so a damaged file is refused at
/// start-up rather than failing lookups later; the first records also tell the layout.
fn verify_and_detect(reader: &Reader<SharedBytes>) -> Result<Layout, String> {
    let all: &str = if reader.metadata.ip_version == 4 {
        "0.0.0.0/0"
    } else {
        "::/0"
    };
    let network = all.parse().map_err(|e| format!("{e}"))?;
    let within = reader
        .within(network, WithinOptions::default())
        .map_err(|e| format!("cannot walk the search tree: {e}"))?;
    let mut layout = None;
    let mut records = 0u64;
    // A tree of n nodes has at most 2n leaves; more means the walk is going in circles.
    let most = 2 * reader.metadata.node_count as u64 + 2;
    for item in within {
        let item = item.map_err(|e| format!("damaged search tree: {e}"))?;
        if records >= most {
            return Err("the search tree has cycles".into());
        }
        let keys = item
            .decode::<Keys>()
            .map_err(|e| format!("damaged record: {e}"))?
            .ok_or("a network without a record")?;
        let this = if keys.country_code.is_some() && keys.country.is_none() {
            Layout::DbIpFlat
        } else {
            Layout::MaxMindCity
        };
        match layout {
            None => layout = Some(this),
            Some(seen) if seen != this => return Err("records of two different layouts".into()),
            Some(_) => {}
        }
        // Decoding the full record checks the parts lookups will read.
        let full = match this {
            Layout::MaxMindCity => item.decode::<MaxMindCity>().map(|_| ()),
            Layout::DbIpFlat => item.decode::<DbIpCity>().map(|_| ()),
        };
        full.map_err(|e| format!("damaged record: {e}"))?;
        records += 1;
    }
    if records == 0 {
        return Err("the database holds no records".into());
    }
    layout.ok_or_else(|| "no layout".into())
}

/// The configured database, swappable while running.
#[derive(Debug, Default)]
pub struct GeoIp {
    paths: Vec<PathBuf>,
    current: RwLock<Option<Arc<GeoDatabase>>>,
    loaded_mtimes: RwLock<Vec<Option<SystemTime>>>,
}

impl GeoIp {
    /// No database configured: `ip_to_geo` leaves events as they are.
    pub fn none() -> Self {
        Self::default()
    }

    /// Opens the configured files (an error here stops start-up).
    pub fn open(paths: Vec<PathBuf>) -> Result<Self, GeoError> {
        if paths.is_empty() {
            return Ok(Self::none());
        }
        let database = GeoDatabase::open(&paths)?;
        let mtimes = mtimes(&paths);
        for (path, layout) in database.layouts() {
            tracing::info!(path = %path.display(), ?layout, "GeoIP database loaded");
        }
        Ok(Self {
            paths,
            current: RwLock::new(Some(Arc::new(database))),
            loaded_mtimes: RwLock::new(mtimes),
        })
    }

    /// The database to use for a batch of events (cheap: an `Arc` clone).
    pub fn current(&self) -> Option<Arc<GeoDatabase>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether a database is configured.
    pub fn is_configured(&self) -> bool {
        !self.paths.is_empty()
    }

    /// Reloads if a file changed since it was loaded (or always, with `force`). A replacement
    /// that does not verify is refused and the old database stays in use.
    pub fn reload(&self, force: bool) -> Result<bool, GeoError> {
        if self.paths.is_empty() {
            return Ok(false);
        }
        let now = mtimes(&self.paths);
        if !force && *self.loaded_mtimes.read().unwrap_or_else(|p| p.into_inner()) == now {
            return Ok(false);
        }
        let database = GeoDatabase::open(&self.paths)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(database));
        *self.loaded_mtimes.write().unwrap_or_else(|p| p.into_inner()) = now;
        tracing::info!(paths = ?self.paths, "GeoIP database reloaded");
        Ok(true)
    }
}

fn mtimes(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value, json};

    fn testdata(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/testdata/geoip")
            .join(name)
    }

    /// What Keen's output should be for a record of MaxMind's JSON source.
    fn expected_from_source(record: &Value) -> Map<String, Value> {
        let mut out = Map::new();
        let mut put = |key: &str, value: Option<&Value>| {
            if let Some(Value::String(s)) = value {
                out.insert(key.into(), Value::String(s.clone()));
            }
        };
        put("city", record.pointer("/city/names/en"));
        put("province", record.pointer("/subdivisions/0/names/en"));
        put("country", record.pointer("/country/names/en"));
        put("country_code", record.pointer("/country/iso_code"));
        put("continent", record.pointer("/continent/names/en"));
        put("postal_code", record.pointer("/postal/code"));
        if let (Some(lat), Some(lon)) = (
            record.pointer("/location/latitude"),
            record.pointer("/location/longitude"),
        ) {
            out.insert("coordinates".into(), json!([lon.as_f64(), lat.as_f64()]));
        }
        out
    }

    #[test]
    fn every_network_of_the_geolite2_test_database_resolves_as_its_source_says() {
        let db = GeoDatabase::open(&[testdata("GeoLite2-City-Test.mmdb")]).unwrap();
        assert_eq!(db.layouts()[0].1, Layout::MaxMindCity);
        let source: Vec<Map<String, Value>> =
            serde_json::from_slice(&std::fs::read(testdata("GeoLite2-City-Test.json")).unwrap()).unwrap();
        let mut checked = 0;
        for entry in source {
            for (network, record) in entry {
                let first_ip: IpAddr = network.split('/').next().unwrap().parse().unwrap();
                let expected = expected_from_source(&record);
                match db.lookup(first_ip) {
                    GeoLookup::Found(found) => {
                        let found: Map<String, Value> = serde_json::from_str(&found).unwrap();
                        assert_eq!(found, expected, "{network}")
                    }
                    GeoLookup::NotFound => panic!("{network} not found"),
                }
                checked += 1;
            }
        }
        assert!(checked > 200, "{checked}");
    }

    /// The record cache gives the uncached answers, for every network of both test databases,
    /// with one cache used for the first database and then the second (a reload).
    #[test]
    fn cached_lookups_equal_uncached_ones_across_a_database_change() {
        let mut cache = GeoRecordCache::default();
        let source: Vec<Map<String, Value>> =
            serde_json::from_slice(&std::fs::read(testdata("GeoLite2-City-Test.json")).unwrap()).unwrap();
        let mut ips: Vec<IpAddr> = source
            .iter()
            .flat_map(|entry| entry.keys())
            .map(|network| network.split('/').next().unwrap().parse().unwrap())
            .collect();
        ips.push("10.0.0.1".parse().unwrap());
        for name in [
            "GeoLite2-City-Test.mmdb",
            "GeoIP2-City-Test.mmdb",
            "GeoLite2-City-Test.mmdb",
        ] {
            let db = GeoDatabase::open(&[testdata(name)]).unwrap();
            // A new opening starts from an empty cache: another file's offsets may name other
            // records.
            db.lookup_cached(ips[0], &mut cache);
            assert!(cache.records.len() <= 1, "{name}: {}", cache.records.len());
            let mut differ = 0;
            for _ in 0..2 {
                for &ip in &ips {
                    assert_eq!(db.lookup_cached(ip, &mut cache), db.lookup(ip), "{name} {ip}");
                }
            }
            assert!(
                !cache.records.is_empty() && cache.records.len() < ips.len(),
                "{name}"
            );
            // The two databases answer some addresses differently, so after each switch the
            // equality above compares against answers that changed. (Their offsets happen not
            // to collide, so only the emptiness check above catches a cache kept across a
            // switch.)
            let other = GeoDatabase::open(&[testdata("GeoIP2-City-Test.mmdb")]).unwrap();
            for &ip in &ips {
                differ += usize::from(other.lookup(ip) != db.lookup(ip));
            }
            assert!(name.starts_with("GeoIP2") || differ > 0, "{name}");
        }
    }

    #[test]
    fn known_addresses_resolve_to_keens_shape() {
        let db = GeoDatabase::open(&[testdata("GeoIP2-City-Test.mmdb")]).unwrap();
        let GeoLookup::Found(found) = db.lookup("81.2.69.142".parse().unwrap()) else {
            panic!("81.2.69.142 not found");
        };
        assert_eq!(
            serde_json::from_str::<Value>(&found).unwrap(),
            json!({"city": "London", "province": "England", "country": "United Kingdom", "country_code": "GB",
                   "continent": "Europe", "coordinates": [-0.0931, 51.5142]})
        );
        assert_eq!(db.lookup("10.0.0.1".parse().unwrap()), GeoLookup::NotFound);
    }

    #[test]
    fn corrupt_databases_are_refused_with_a_clear_error() {
        for name in [
            "GeoIP2-City-Test-Invalid-Node-Count.mmdb",
            "GeoIP2-City-Test-Broken-Double-Format.mmdb",
        ] {
            let error = GeoDatabase::open(&[testdata(name)]).expect_err(name);
            let text = error.to_string();
            assert!(text.contains(name) && text.len() > name.len() + 20, "{text}");
        }
        let missing = GeoDatabase::open(&[testdata("no-such.mmdb")]).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
    }
}
