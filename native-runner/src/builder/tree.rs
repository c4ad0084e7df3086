//! Steps that change the image tree directly (`env`, `workdir`, `add_local_*`), and the
//! image config kept in it.

use super::*;

/// Reads an image's [`ImageConfig`]; an image without one gets the defaults.
pub async fn read_config(
    index: &lode_fs::Index,
    registry: &dyn BlobAccess,
) -> Result<ImageConfig, BuildError> {
    let Some(entry) = index.resolve(CONFIG_PATH) else {
        return Ok(ImageConfig::default());
    };
    let bytes = match entry.content() {
        Some(lode_fs::Content::Inline(bytes)) => bytes.to_vec(),
        Some(lode_fs::Content::Chunks(chunks)) => {
            let mut bytes = Vec::new();
            for chunk in chunks {
                bytes.extend_from_slice(&registry.get_blob(&chunk.digest()).await?);
            }
            bytes
        }
        None => return Ok(ImageConfig::default()),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| BuildError::Other(format!("the image's /{CONFIG_PATH} is not valid: {e}")))
}

/// A directory made by a step: root-owned, 0755, at the epoch, so builds are repeatable.
pub(super) fn new_dir(name: &[u8]) -> Node {
    Node {
        name: name.to_vec(),
        meta: Meta {
            mode: 0o755,
            ..Meta::default()
        },
        xattrs: Vec::new(),
        body: Body::Dir(Vec::new()),
    }
}

/// The directory at `path` in `tree`, made (with its parents) where missing. A component
/// that is something else, a symlink included, is an error: the step names a real path.
pub(super) fn dir_at<'a>(tree: &'a mut Node, path: &str) -> Result<&'a mut Vec<Node>, BuildError> {
    let mut node = tree;
    let mut walked = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        walked.push('/');
        walked.push_str(part);
        let Body::Dir(children) = &mut node.body else {
            unreachable!("only directories are walked into")
        };
        let at = match children.iter().position(|c| c.name == part.as_bytes()) {
            Some(at) => at,
            None => {
                children.push(new_dir(part.as_bytes()));
                children.len() - 1
            }
        };
        node = &mut children[at];
        if !matches!(node.body, Body::Dir(_)) {
            return Err(BuildError::Spec(format!(
                "{walked} is not a directory in the image (a symlink or file); name the real path"
            )));
        }
    }
    let Body::Dir(children) = &mut node.body else {
        unreachable!("checked above")
    };
    Ok(children)
}

pub(super) fn ensure_dir(tree: &mut Node, path: &str) -> Result<(), BuildError> {
    dir_at(tree, path).map(|_| ())
}

/// Puts `node` at `path`, replacing what was there.
pub(super) fn place(tree: &mut Node, path: &str, mut node: Node) -> Result<(), BuildError> {
    let path = path.trim_end_matches('/');
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    node.name = name.as_bytes().to_vec();
    let children = dir_at(tree, parent)?;
    children.retain(|c| c.name != node.name);
    children.push(node);
    Ok(())
}

pub(super) fn write_config(tree: &mut Node, config: &ImageConfig) -> Result<(), BuildError> {
    let bytes = serde_json::to_vec_pretty(config).expect("config serializes");
    let node = Node {
        name: Vec::new(),
        meta: Meta {
            mode: 0o644,
            ..Meta::default()
        },
        xattrs: Vec::new(),
        body: Body::File {
            content: FileContent::Inline(bytes),
            link_group: None,
        },
    };
    place(tree, &format!("/{CONFIG_PATH}"), node)
}
