//! Reading photos into 8-bit RGB, whatever their format, bit depth, channels and EXIF orientation.
//!
//! The `image` crate reads the common formats; HEIC photos (an iPhone's default) are decoded by
//! `heifer` and turned as their file says. Colours are converted to sRGB from the photo's
//! embedded profile (a phone's Display P3, a camera's Adobe RGB), as a colour-managed viewer
//! shows them: the networks and the texture expect sRGB.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, RgbImage};
use rayon::prelude::*;

use super::{FaceError, Result};

/// The most pixels a photo may have: a fit holds the photo and a rasterization of it in 32-bit
/// floats (about 45 bytes a pixel in all; a 48-megapixel photo peaks at 2.1 GB), so a header
/// claiming far more would exhaust the memory before anything else could say why.
pub const MAX_IMAGE_PIXELS: u64 = 150_000_000;

/// [`FaceError::ImageTooLarge`] where a `width` × `height` image (named `origin` in the
/// message) has more than [`MAX_IMAGE_PIXELS`].
pub fn check_pixel_count(width: u32, height: u32, origin: &str) -> Result<()> {
    if u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS {
        return Err(FaceError::ImageTooLarge {
            origin: origin.to_string(),
            width,
            height,
            max_megapixels: MAX_IMAGE_PIXELS / 1_000_000,
        });
    }
    Ok(())
}

/// Reads an image file as upright 8-bit RGB.
///
/// Grayscale is replicated to three channels, alpha is dropped, 16-bit and float samples are
/// scaled to 8 bits, CMYK JPEGs are converted to RGB, colours to sRGB from the photo's embedded
/// ICC profile (HEIC's too), and the EXIF orientation (HEIC: the file's rotation and mirroring)
/// is applied so the face is upright as a viewer shows it.
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| FaceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_rgb_named(&bytes, &path.display().to_string(), path)
}

/// The formats [`load_rgb`] reads besides PNG and JPEG, for messages that name them.
pub const OTHER_PHOTO_FORMATS: &str = "HEIC, TIFF, WebP, BMP, GIF, PNM, TGA, ICO and QOI";

/// Whether `path`'s extension names a format [`load_rgb`] reads (which reads a file by its
/// contents, whatever its name: this is for picking the photos out of a folder).
pub fn is_photo_name(path: impl AsRef<Path>) -> bool {
    let path = path.as_ref();
    let heif = path.extension().is_some_and(|e| {
        ["heic", "heif", "hif"]
            .iter()
            .any(|name| e.eq_ignore_ascii_case(name))
    });
    heif || ImageFormat::from_path(path).is_ok_and(|f| f.reading_enabled())
}

/// Reads only an image file's header: its width and height, or the error [`load_rgb`] gives
/// for a file that cannot be opened, is not an image of a supported format, or has too many
/// pixels. (A damaged body shows only when the file is decoded.) Cheap enough to check many
/// photos before fitting any.
pub fn probe_image(path: impl AsRef<Path>) -> Result<(u32, u32)> {
    let path = path.as_ref();
    let origin = path.display().to_string();
    if file_starts_as_heif(path)? {
        // The container's boxes sit anywhere in the file; the picture is not decoded.
        let bytes = std::fs::read(path).map_err(|source| FaceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (width, height) = heif_size(&bytes, &origin)?;
        check_pixel_count(width, height, &origin)?;
        return Ok((width, height));
    }
    let reader = ImageReader::open(path)
        .map_err(|source| FaceError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .with_guessed_format()
        .map_err(|e| unsupported(&origin, e.to_string()))?;
    if reader.format().is_none() {
        return Err(unsupported(
            &origin,
            "unrecognised file signature".to_string(),
        ));
    }
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| decode_error(&origin, e))?;
    check_pixel_count(width, height, &origin)?;
    Ok((width, height))
}

/// Whether the file at `path` begins as a HEIF file does ([`is_heif`]).
fn file_starts_as_heif(path: &Path) -> Result<bool> {
    use std::io::Read;
    let io_error = |source| FaceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut start = Vec::with_capacity(12);
    std::fs::File::open(path)
        .map_err(io_error)?
        .take(12)
        .read_to_end(&mut start)
        .map_err(io_error)?;
    Ok(is_heif(&start))
}

/// Whether `bytes` begin with the file-type box of a HEIF image (HEIC's `heic`/`heix` brands,
/// or the generic `mif1`/`mif2`, whose codec the decoder finds out).
fn is_heif(bytes: &[u8]) -> bool {
    bytes.get(4..8) == Some(b"ftyp")
        && matches!(
            heifer::check_file_type(bytes),
            heifer::FileTypeResult::Supported | heifer::FileTypeResult::MayBe
        )
}

/// The width and height of a HEIF file's primary image as a viewer shows it (after a quarter
/// turn, if the file asks for one; before a crop, which only makes it smaller), from its
/// container alone.
fn heif_size(bytes: &[u8], origin: &str) -> Result<(u32, u32)> {
    let corrupt = |reason: String| FaceError::CorruptImage {
        origin: origin.to_string(),
        reason,
    };
    let file =
        heifer::heifer_isobmff::HeifFile::parse(bytes).map_err(|e| corrupt(e.to_string()))?;
    let (width, height) = file
        .image_size(file.primary_id)
        .map_err(|e| corrupt(e.to_string()))?
        .ok_or_else(|| corrupt("the primary image has no size".to_string()))?;
    let turned = file
        .item_properties(file.primary_id)
        .map_err(|e| corrupt(e.to_string()))?
        .any(|p| matches!(p, heifer::heifer_isobmff::boxes::Property::Rotation(r) if r % 2 == 1));
    Ok(if turned {
        (height, width)
    } else {
        (width, height)
    })
}

/// Decodes a HEIF file ([`is_heif`]) as upright 8-bit sRGB.
fn decode_heif(bytes: &[u8], origin: &str) -> Result<RgbImage> {
    let (width, height) = heif_size(bytes, origin)?;
    check_pixel_count(width, height, origin)?;
    let options = heifer::Options {
        max_pixels: MAX_IMAGE_PIXELS,
        ..heifer::Options::default()
    };
    let rgba = heifer::decode_srgb_rgba8(bytes, &options).map_err(|error| match error {
        heifer::Error::Unsupported(reason) => unsupported(origin, reason),
        other => FaceError::CorruptImage {
            origin: origin.to_string(),
            reason: other.to_string(),
        },
    })?;
    let rgb: Vec<u8> = rgba
        .data
        .chunks_exact(4)
        .flat_map(|pixel| [pixel[0], pixel[1], pixel[2]])
        .collect();
    RgbImage::from_raw(rgba.width, rgba.height, rgb).ok_or_else(|| FaceError::CorruptImage {
        origin: origin.to_string(),
        reason: "the decoder returned fewer pixels than the image has".to_string(),
    })
}

fn unsupported(origin: &str, reason: String) -> FaceError {
    FaceError::UnsupportedImage {
        origin: origin.to_string(),
        reason,
    }
}

/// A decoder's error: an unsupported feature of the format, or a damaged file.
fn decode_error(origin: &str, error: ImageError) -> FaceError {
    match error {
        ImageError::Unsupported(u) => unsupported(origin, u.to_string()),
        other => FaceError::CorruptImage {
            origin: origin.to_string(),
            reason: other.to_string(),
        },
    }
}

/// Decodes an in-memory image file as upright 8-bit RGB; see [`load_rgb`]. `origin` names the
/// bytes in error messages.
pub fn decode_rgb(bytes: &[u8], origin: &str) -> Result<RgbImage> {
    decode_rgb_named(bytes, origin, Path::new(""))
}

/// [`decode_rgb`] of a file at `path`, whose extension says the format where the bytes carry no
/// signature to tell it by (TGA).
fn decode_rgb_named(bytes: &[u8], origin: &str, path: &Path) -> Result<RgbImage> {
    if is_heif(bytes) {
        return decode_heif(bytes, origin);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| unsupported(origin, e.to_string()))?;
    if reader.format().is_none() && ImageFormat::from_path(path).ok() == Some(ImageFormat::Tga) {
        reader.set_format(ImageFormat::Tga);
    }
    match reader.format() {
        None => {
            return Err(unsupported(
                origin,
                "unrecognised file signature".to_string(),
            ));
        }
        // The JPEG decoder fills a cut-off scan with grey and reports nothing: the fit would
        // then run on a damaged photo, or find no face in it.
        Some(ImageFormat::Jpeg) if !jpeg_is_complete(bytes) => {
            return Err(FaceError::CorruptImage {
                origin: origin.to_string(),
                reason: "the JPEG data stops before its end-of-image marker".to_string(),
            });
        }
        Some(_) => {}
    }
    let to_face_error = |e: ImageError| decode_error(origin, e);
    let mut decoder = reader.into_decoder().map_err(to_face_error)?;
    let (width, height) = decoder.dimensions();
    check_pixel_count(width, height, origin)?;
    let orientation = decoder.orientation().map_err(to_face_error)?;
    // A damaged profile is no reason to refuse the photo: its pixels are taken as sRGB.
    let profile = decoder.icc_profile().ok().flatten();
    let mut image = DynamicImage::from_decoder(decoder).map_err(to_face_error)?;
    image.apply_orientation(orientation);
    let mut rgb = image.into_rgb8();
    if let Some(profile) = profile {
        convert_to_srgb(&mut rgb, &profile);
    }
    Ok(rgb)
}

/// Converts `rgb` from the RGB colour space the ICC `profile` describes to sRGB. Profiles of
/// sRGB's primaries (most photos that carry a profile), of other colour spaces (a grey or CMYK
/// photo's, whose pixels are RGB by now), and ones that cannot be read leave the pixels as
/// they are.
fn convert_to_srgb(rgb: &mut RgbImage, profile: &[u8]) {
    use moxcms::{ColorProfile, DataColorSpace, Layout, TransformOptions};
    let Ok(source) = ColorProfile::new_from_slice(profile) else {
        return;
    };
    let srgb = ColorProfile::new_srgb();
    let primaries = |p: &ColorProfile| {
        [p.red_colorant, p.green_colorant, p.blue_colorant].map(|c| [c.x, c.y, c.z])
    };
    let (theirs, ours) = (primaries(&source), primaries(&srgb));
    let same_primaries = theirs
        .iter()
        .flatten()
        .zip(ours.iter().flatten())
        .all(|(a, b)| (a - b).abs() < 2e-3);
    if source.color_space != DataColorSpace::Rgb || same_primaries {
        return;
    }
    let Ok(transform) =
        source.create_transform_8bit(Layout::Rgb, &srgb, Layout::Rgb, TransformOptions::default())
    else {
        return;
    };
    // Rows in blocks across the cores; a block the transform refuses stays as it was.
    let block_len = (rgb.width() as usize * 3 * 64).max(1);
    rgb.par_chunks_mut(block_len).for_each(|block| {
        let original = block.to_vec();
        if transform.transform(&original, block).is_err() {
            block.copy_from_slice(&original);
        }
    });
}

/// Whether the JPEG's segments and scans run on to its end-of-image marker (`FF D9`) before
/// the bytes run out. The walk follows the segment lengths and skips each scan's coded data
/// (where an `FF` byte is followed by `00` or a restart marker), so nothing after the first
/// end-of-image marker counts: phones append videos and other data there. Bytes that do not
/// look like a JPEG's structure are left to the decoder to judge.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    const END_OF_IMAGE: u8 = 0xD9;
    const START_OF_SCAN: u8 = 0xDA;
    let is_restart = |marker: u8| (0xD0..=0xD7).contains(&marker);
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return true;
    }
    let mut at = 2;
    loop {
        if bytes.get(at).is_some_and(|&byte| byte != 0xFF) {
            return true;
        }
        // A marker: any number of FF fill bytes, then its code.
        while bytes.get(at) == Some(&0xFF) {
            at += 1;
        }
        let Some(&marker) = bytes.get(at) else {
            return false;
        };
        at += 1;
        if marker == END_OF_IMAGE {
            return true;
        }
        if is_restart(marker) || marker == 0x01 {
            continue;
        }
        let Some(length) = bytes.get(at..at + 2) else {
            return false;
        };
        at += usize::from(u16::from_be_bytes([length[0], length[1]]));
        if at > bytes.len() {
            return false;
        }
        if marker == START_OF_SCAN {
            loop {
                match (bytes.get(at), bytes.get(at + 1)) {
                    (Some(0xFF), Some(&next)) if next != 0x00 && !is_restart(next) => break,
                    (Some(_), Some(_)) => at += 1,
                    _ => return false,
                }
            }
        }
    }
}
