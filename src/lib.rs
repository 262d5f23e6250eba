//! ganfit: identity-faithful, textured 3D faces from one photo, after GANFIT (Gecer et al.,
//! CVPR 2019).
//!
//! [`Fitter`] is the entry point: `Fitter::builder().build()?.fit(&photo)?`. This facade also
//! re-exports the workspace's layers — assets, morphable model, texture model, differentiable
//! renderer, loss networks and optimiser — so that an application needs a single dependency;
//! each layer is usable on its own through its module here.

mod atlas;
mod correspondence;
pub mod evaluate;
mod eyes;
mod fitter;
mod off_face;
pub mod synthetic;

pub use atlas::EyeColours;
pub use correspondence::{
    MeshCorrespondence, estimate_head_yaw_deg, head_yaw_deg, nearest_yaw_table,
};
pub use eyes::EyeTexture;
pub use fitter::{
    Error, FitResult, Fitter, FitterBuilder, Progress, Result, ViewStyle, descriptor_distance,
    face_descriptor,
};
pub use ganfit_assets as assets;
pub use ganfit_losses as losses;
pub use ganfit_morphable as morphable;
pub use ganfit_optim as optim;
pub use ganfit_render as render;
pub use ganfit_texture as texture;

/// Resolves `id` to a verified file, converting it first (into the cache, from its local or,
/// with the `download` feature, upstream source) when it is one of the morphable models that
/// are built on first use.
pub fn prepare_asset(
    resolver: &assets::Resolver,
    id: &str,
) -> Result<std::path::PathBuf, assets::AssetError> {
    match id {
        morphable::ICT_ASSET_ID => resolver.resolve_or_build(id, &morphable::IctSource::default()),
        morphable::SFM_ASSET_ID => resolver.resolve_or_build(id, &morphable::SfmSource),
        _ => resolver.resolve(id),
    }
}

/// Every asset id in the manifest with where it resolves now, or why it does not.
///
/// Assets that are built from a local source on first use (the converted 3D morphable models)
/// report "not built yet" until then.
pub fn asset_report(
    resolver: &assets::Resolver,
) -> Vec<(
    assets::AssetEntry,
    Result<std::path::PathBuf, assets::AssetError>,
)> {
    resolver
        .manifest()
        .assets
        .iter()
        .map(|entry| (entry.clone(), resolver.resolve(&entry.id)))
        .collect()
}
