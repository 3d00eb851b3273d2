//! First run: with no config, a development config for the data directory is
//! generated once (a `dev` tenant with fresh ingest, read and admin keys) and reused
//! on every later start, so keys, data and alerts survive restarts.

use meterline_schemas::tenants::hash_key;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::EmbeddedError;

/// The generated config's file name inside the data directory.
pub const CONFIG_FILE: &str = "meterline.toml";
/// The generated keys, as shell variable assignments, beside the config.
pub const KEYS_FILE: &str = "dev-keys.env";

/// Keys generated on first run; shown once, and kept in [`KEYS_FILE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevKeys {
    pub ingest: String,
    pub read: String,
    /// For plans and subscriptions (limits). Data directories generated
    /// before limits existed have none: `meterline keys new --tenant dev
    /// --scopes admin` adds one.
    pub admin: Option<String>,
}

fn random_key(prefix: &str) -> Result<String, EmbeddedError> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| EmbeddedError::config("tenants.keys", format!("no randomness for a key: {e}")))?;
    Ok(format!("{prefix}_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// The config path for `data_dir`, generating the config first if it is
/// missing. Returns the keys when they were generated now.
pub fn ensure(data_dir: &Path) -> Result<(PathBuf, Option<DevKeys>), EmbeddedError> {
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join(CONFIG_FILE);
    if path.exists() {
        return Ok((path, None));
    }
    let admin = random_key("mlk_admin")?;
    let keys = DevKeys { ingest: random_key("mlk_ingest")?, read: random_key("mlk_read")?, admin: Some(admin.clone()) };
    let text = format!(
        "# Generated on first run for this data directory: a development tenant.\n\
         # The keys are stored here as SHA-256 hashes; the keys themselves are in {KEYS_FILE}.\n\
         # Every setting and its default: README.md, \"Configuration\".\n\
         [server]\n\
         listen = \"127.0.0.1:8080\"\n\n\
         [[tenants]]\n\
         id = \"dev\"\n\
         # Events may report revenue in credits; one credit is worth this much.\n\
         credit_price_usd = \"0.001\"\n\n\
         [[tenants.keys]]\n\
         name = \"dev-ingest\"\n\
         sha256 = \"{}\"\n\
         scopes = [\"ingest\"]\n\n\
         [[tenants.keys]]\n\
         name = \"dev-read\"\n\
         sha256 = \"{}\"\n\
         scopes = [\"read\"]\n\n\
         # Plans and subscriptions (limits) need the admin scope.\n\
         [[tenants.keys]]\n\
         name = \"dev-admin\"\n\
         sha256 = \"{}\"\n\
         scopes = [\"admin\"]\n",
        hash_key(&keys.ingest),
        hash_key(&keys.read),
        hash_key(&admin)
    );
    write_private(
        &data_dir.join(KEYS_FILE),
        &format!("METERLINE_INGEST_KEY={}\nMETERLINE_READ_KEY={}\nMETERLINE_ADMIN_KEY={admin}\n", keys.ingest, keys.read),
    )?;
    // The config last: its presence means the keys file is complete.
    write_private(&path, &text)?;
    Ok((path, Some(keys)))
}

/// The keys kept by [`ensure`], if this data directory has them.
pub fn stored_keys(data_dir: &Path) -> Option<DevKeys> {
    let text = std::fs::read_to_string(data_dir.join(KEYS_FILE)).ok()?;
    let get = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix('=').map(str::to_owned));
    Some(DevKeys { ingest: get("METERLINE_INGEST_KEY")?, read: get("METERLINE_READ_KEY")?, admin: get("METERLINE_ADMIN_KEY") })
}

fn write_private(path: &Path, text: &str) -> Result<(), EmbeddedError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config holds the admin key's hash with the admin scope, never the key.
    fn text_has_admin(dir: &Path, admin: &str) -> bool {
        let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap_or_default();
        text.contains(&hash_key(admin)) && !text.contains(admin) && text.contains("scopes = [\"admin\"]")
    }

    #[test]
    fn generates_once_and_keeps_the_keys() {
        let dir = std::env::temp_dir().join(format!("meterline-devconfig-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (path, keys) = ensure(&dir).unwrap();
        let keys = keys.expect("generated on first run");
        assert_ne!(keys.ingest, keys.read);
        let admin = keys.admin.clone().expect("an admin key for limits");
        assert!(text_has_admin(&dir, &admin));
        assert_eq!(stored_keys(&dir), Some(keys.clone()));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&hash_key(&keys.ingest)) && !text.contains(&keys.ingest));
        let config = crate::Config::load(&text, []).unwrap();
        assert_eq!(config.tenants[0].id, "dev");
        let (_, again) = ensure(&dir).unwrap();
        assert_eq!(again, None, "a second start reuses the config");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
