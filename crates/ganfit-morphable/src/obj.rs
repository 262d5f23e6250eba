//! The subset of Wavefront OBJ that ICT-FaceKit uses: `v`, `vt` and polygon `f v/vt` lines.

use crate::{MorphableError, Result};

/// A polygon mesh with per-corner texture coordinates, as read from an OBJ file.
#[derive(Debug, Clone, Default)]
pub(crate) struct ObjMesh {
    pub positions: Vec<[f32; 3]>,
    pub uvs: Vec<[f32; 2]>,
    /// Triangles made from the polygons (fans), as vertex indices.
    pub triangles: Vec<[u32; 3]>,
    /// The same triangles' corners as indices into `uvs`.
    pub uv_triangles: Vec<[u32; 3]>,
}

fn invalid(file: &str, line: usize, reason: impl std::fmt::Display) -> MorphableError {
    MorphableError::InvalidSource {
        file: file.to_string(),
        format: "Wavefront OBJ",
        reason: format!("line {line}: {reason}"),
    }
}

fn floats<const N: usize>(rest: &str, file: &str, line: usize) -> Result<[f32; N]> {
    let mut out = [0f32; N];
    let mut fields = rest.split_ascii_whitespace();
    for o in &mut out {
        let field = fields
            .next()
            .ok_or_else(|| invalid(file, line, format!("expected {N} numbers")))?;
        *o = field
            .parse()
            .map_err(|_| invalid(file, line, format!("`{field}` is not a number")))?;
    }
    Ok(out)
}

/// Parses a 1-based OBJ index that must lie within `count` items.
fn index(field: &str, count: usize, file: &str, line: usize) -> Result<u32> {
    field
        .parse::<usize>()
        .ok()
        .filter(|&i| (1..=count).contains(&i))
        .map(|i| (i - 1) as u32)
        .ok_or_else(|| {
            invalid(
                file,
                line,
                format!("bad index `{field}` (there are {count})"),
            )
        })
}

/// Reads only the vertex positions of an OBJ file; the blendshape files repeat the neutral
/// mesh's topology, which the converter takes from the neutral mesh alone.
pub(crate) fn parse_positions(text: &str, file: &str) -> Result<Vec<[f32; 3]>> {
    let mut positions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("v ") {
            positions.push(floats::<3>(rest, file, i + 1)?);
        }
    }
    Ok(positions)
}

/// Parses positions, UVs and polygons. Polygons are split into fans `(0, k, k+1)`, which keeps
/// the file's counter-clockwise winding.
pub(crate) fn parse_mesh(text: &str, file: &str) -> Result<ObjMesh> {
    let mut mesh = ObjMesh::default();
    let mut corners: Vec<(u32, u32)> = Vec::with_capacity(8);
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if let Some(rest) = line.strip_prefix("v ") {
            mesh.positions.push(floats::<3>(rest, file, n)?);
        } else if let Some(rest) = line.strip_prefix("vt ") {
            mesh.uvs.push(floats::<2>(rest, file, n)?);
        } else if let Some(rest) = line.strip_prefix("f ") {
            corners.clear();
            for corner in rest.split_ascii_whitespace() {
                let mut parts = corner.split('/');
                let v = index(parts.next().unwrap_or(""), mesh.positions.len(), file, n)?;
                let vt = match parts.next() {
                    Some(t) => index(t, mesh.uvs.len(), file, n)?,
                    None => return Err(invalid(file, n, "a face corner has no texture index")),
                };
                corners.push((v, vt));
            }
            if corners.len() < 3 {
                return Err(invalid(file, n, "a face has fewer than 3 corners"));
            }
            for k in 1..corners.len() - 1 {
                let tri = [corners[0], corners[k], corners[k + 1]];
                mesh.triangles.push(tri.map(|c| c.0));
                mesh.uv_triangles.push(tri.map(|c| c.1));
            }
        }
    }
    Ok(mesh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quads_become_two_triangles_with_the_same_winding() {
        let text = "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\n\
                    f 1/1 2/2 3/3 4/4\n";
        let m = parse_mesh(text, "quad.obj").unwrap();
        assert_eq!(m.triangles, [[0, 1, 2], [0, 2, 3]]);
        assert_eq!(m.uv_triangles, [[0, 1, 2], [0, 2, 3]]);
    }

    #[test]
    fn bad_lines_give_errors_with_line_numbers() {
        let err = parse_mesh("v 0 0\n", "a.obj").unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("expected 3"),
            "{err}"
        );
        let err = parse_mesh("v 0 0 0\nvt 0 0\nf 1/1 2/1 1/1\n", "a.obj").unwrap_err();
        assert!(err.to_string().contains("bad index `2`"), "{err}");
        let err = parse_positions("v 0 x 0\n", "a.obj").unwrap_err();
        assert!(err.to_string().contains("`x` is not a number"), "{err}");
    }
}
