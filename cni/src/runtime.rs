//! The runtime's side of CNI, as containerd and CRI-O drive it (libcni's semantics): run each
//! plugin of a configuration list with the `CNI_*` environment and the config on stdin,
//! injecting `name`, `cniVersion`, `prevResult` and the `runtimeConfig` entries a plugin
//! declares among its `capabilities`. The lab, the end-to-end tests and the benchmark use it,
//! so the plugin is always exercised exactly as a container runtime would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::{Map, Value, json};
use trellis_netns::Netns;

use crate::error::CniError;

/// A `.conflist`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfList {
    pub cni_version: String,
    pub name: String,
    pub plugins: Vec<Value>,
}

/// One container's attachment, as the runtime describes it.
#[derive(Debug, Clone, Default)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, `mac`, ...), given to plugins that ask for them.
    pub capabilities: Map<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("plugin {0} not found in the plugin directories")]
    PluginNotFound(String),
    #[error("plugin entry has no \"type\"")]
    MissingType,
    #[error("run plugin {plugin}")]
    Spawn {
        plugin: String,
        source: std::io::Error,
    },
    #[error("enter the plugins' namespace")]
    Netns(#[from] trellis_netns::Error),
    #[error("plugin {plugin} failed with code {}", .error.code)]
    Plugin {
        plugin: String,
        #[source]
        error: CniError,
    },
    #[error("plugin {plugin} printed something that is not CNI JSON ({status}): {output}")]
    BadOutput {
        plugin: String,
        status: String,
        output: String,
    },
}

impl InvokeError {
    /// The plugin's error code, when the plugin itself failed.
    pub fn code(&self) -> Option<u32> {
        match self {
            Self::Plugin { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

/// Where plugins are found and in which namespace they run.
#[derive(Debug)]
pub struct Runtime {
    pub plugin_dirs: Vec<PathBuf>,
    /// The node's namespace; `None` runs plugins where the caller is.
    pub node: Option<Netns>,
    /// Extra environment for every plugin (runtimes pass their own environment along).
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Add,
    Check,
    Del,
    Gc,
    Status,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Check => "CHECK",
            Self::Del => "DEL",
            Self::Gc => "GC",
            Self::Status => "STATUS",
        }
    }
}

impl Runtime {
    /// ADD through every plugin in order; returns the last plugin's result.
    pub fn add(&self, list: &ConfList, attachment: &Attachment) -> Result<Value, InvokeError> {
        let mut previous: Option<Value> = None;
        for plugin in &list.plugins {
            let conf = plugin_conf(list, plugin, previous.as_ref(), Some(attachment), None);
            previous = self
                .exec(Verb::Add, plugin, &conf, Some(attachment))?
                .or(previous);
        }
        Ok(previous.unwrap_or(Value::Null))
    }

    /// CHECK through every plugin, given the cached result of ADD.
    pub fn check(
        &self,
        list: &ConfList,
        attachment: &Attachment,
        result: &Value,
    ) -> Result<(), InvokeError> {
        for plugin in &list.plugins {
            let conf = plugin_conf(list, plugin, Some(result), Some(attachment), None);
            self.exec(Verb::Check, plugin, &conf, Some(attachment))?;
        }
        Ok(())
    }

    /// DEL through every plugin in reverse order.
    pub fn del(
        &self,
        list: &ConfList,
        attachment: &Attachment,
        result: Option<&Value>,
    ) -> Result<(), InvokeError> {
        for plugin in list.plugins.iter().rev() {
            let conf = plugin_conf(list, plugin, result, Some(attachment), None);
            self.exec(Verb::Del, plugin, &conf, Some(attachment))?;
        }
        Ok(())
    }

    /// GC with the attachments the runtime still knows.
    pub fn gc(&self, list: &ConfList, valid: &[(String, String)]) -> Result<(), InvokeError> {
        let valid: Vec<Value> = valid
            .iter()
            .map(|(id, ifname)| json!({"containerID": id, "ifname": ifname}))
            .collect();
        for plugin in &list.plugins {
            let conf = plugin_conf(list, plugin, None, None, Some(&valid));
            self.exec(Verb::Gc, plugin, &conf, None)?;
        }
        Ok(())
    }

    pub fn status(&self, list: &ConfList) -> Result<(), InvokeError> {
        for plugin in &list.plugins {
            let conf = plugin_conf(list, plugin, None, None, None);
            self.exec(Verb::Status, plugin, &conf, None)?;
        }
        Ok(())
    }

    fn find(&self, plugin_type: &str) -> Result<PathBuf, InvokeError> {
        self.plugin_dirs
            .iter()
            .map(|dir| dir.join(plugin_type))
            .find(|path| path.is_file())
            .ok_or_else(|| InvokeError::PluginNotFound(plugin_type.to_string()))
    }

    fn exec(
        &self,
        verb: Verb,
        plugin: &Value,
        conf: &Value,
        attachment: Option<&Attachment>,
    ) -> Result<Option<Value>, InvokeError> {
        let plugin_type = plugin
            .get("type")
            .and_then(Value::as_str)
            .ok_or(InvokeError::MissingType)?;
        let binary = self.find(plugin_type)?;
        let mut command = Command::new(&binary);
        command
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("CNI_COMMAND", verb.as_str())
            .env(
                "CNI_PATH",
                std::env::join_paths(&self.plugin_dirs).unwrap_or_default(),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(attachment) = attachment {
            let args: Vec<String> = attachment
                .args
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            command
                .env("CNI_CONTAINERID", &attachment.container_id)
                .env("CNI_NETNS", &attachment.netns)
                .env("CNI_IFNAME", &attachment.ifname)
                .env("CNI_ARGS", args.join(";"));
        }
        let spawned = match &self.node {
            Some(node) => node.spawn(&mut command)?,
            None => command.spawn(),
        };
        let spawn_error = |source| InvokeError::Spawn {
            plugin: plugin_type.to_string(),
            source,
        };
        let mut child = spawned.map_err(spawn_error)?;
        let stdin = serde_json::to_vec(conf).expect("a JSON value serialises");
        if let Some(mut pipe) = child.stdin.take() {
            // A plugin that exits without reading its stdin is judged by its exit status.
            let _ = pipe.write_all(&stdin);
        }
        let output = child.wait_with_output().map_err(spawn_error)?;
        parse_output(plugin_type, &output)
    }
}

fn parse_output(plugin: &str, output: &std::process::Output) -> Result<Option<Value>, InvokeError> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let bad_output = || InvokeError::BadOutput {
        plugin: plugin.to_string(),
        status: output.status.to_string(),
        output: format!(
            "{}{}",
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    };
    if output.status.success() {
        if stdout.trim().is_empty() {
            return Ok(None);
        }
        return serde_json::from_str(&stdout)
            .map(Some)
            .map_err(|_| bad_output());
    }
    #[derive(Deserialize)]
    struct WireError {
        code: u32,
        #[serde(default)]
        msg: String,
        #[serde(default)]
        details: String,
    }
    let error: WireError = serde_json::from_str(&stdout).map_err(|_| bad_output())?;
    Err(InvokeError::Plugin {
        plugin: plugin.to_string(),
        error: CniError::new(error.code, error.msg, error.details),
    })
}

/// One plugin's stdin, built the way libcni builds it.
fn plugin_conf(
    list: &ConfList,
    plugin: &Value,
    previous: Option<&Value>,
    attachment: Option<&Attachment>,
    valid_attachments: Option<&[Value]>,
) -> Value {
    let mut conf = plugin.as_object().cloned().unwrap_or_default();
    conf.insert("name".into(), json!(list.name));
    conf.insert("cniVersion".into(), json!(list.cni_version));
    if let Some(previous) = previous {
        conf.insert("prevResult".into(), previous.clone());
    }
    if let Some(valid) = valid_attachments {
        conf.insert(
            "cni.dev/valid-attachments".into(),
            Value::Array(valid.to_vec()),
        );
    }
    if let (Some(attachment), Some(Value::Object(wanted))) =
        (attachment, plugin.get("capabilities"))
    {
        let runtime_config: Map<String, Value> = wanted
            .iter()
            .filter(|(_, enabled)| enabled.as_bool() == Some(true))
            .filter_map(|(name, _)| {
                Some((name.clone(), attachment.capabilities.get(name)?.clone()))
            })
            .collect();
        if !runtime_config.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
    }
    Value::Object(conf)
}

/// Reads a conflist from disk.
pub fn load_conflist(path: &Path) -> Result<ConfList, std::io::Error> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_conf_injects_name_version_prev_result_and_capabilities() {
        let list: ConfList = serde_json::from_value(json!({
            "cniVersion": "1.1.0",
            "name": "pods",
            "plugins": [
                {"type": "trellis-cni", "podCIDRs": ["10.0.0.0/24"]},
                {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}}
            ]
        }))
        .unwrap();
        let mut attachment = Attachment::default();
        attachment.capabilities.insert(
            "portMappings".into(),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        );
        attachment
            .capabilities
            .insert("bandwidth".into(), json!({"ingressRate": 1}));
        let prev = json!({"cniVersion": "1.1.0", "ips": []});

        let first = plugin_conf(&list, &list.plugins[0], None, Some(&attachment), None);
        assert_eq!(first["name"], "pods");
        assert_eq!(first["cniVersion"], "1.1.0");
        assert!(first.get("prevResult").is_none());
        assert!(
            first.get("runtimeConfig").is_none(),
            "no capabilities asked for, none given"
        );

        let second = plugin_conf(
            &list,
            &list.plugins[1],
            Some(&prev),
            Some(&attachment),
            None,
        );
        assert_eq!(second["prevResult"], prev);
        assert_eq!(second["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert!(
            second["runtimeConfig"].get("bandwidth").is_none(),
            "disabled capability is not passed"
        );
    }
}
