// face-api's own outputs for tests/data/faceapi/face.png: the reference test_faceapi.py holds the
// torch port to. Run once, by hand; the tests only read reference.json.
//
//   mkdir /tmp/ref && cd /tmp/ref && npm install @vladmandic/face-api@1.7.15 \
//       @tensorflow/tfjs@4.22.0 @tensorflow/tfjs-backend-wasm@4.22.0
//   python -c "import numpy as np, PIL.Image as I; \
//       np.asarray(I.open('tests/data/faceapi/face.png').convert('RGB')).tofile('/tmp/ref/face.rgb')"
//   NODE_PATH=/tmp/ref/node_modules node tests/data/faceapi/make_reference.cjs \
//       /tmp/ref/face.rgb 150 180 $FACEDIST_MODEL_DIR/faceapi > tests/data/faceapi/reference.json
//
// tfjs's pure-JS CPU backend (float32), face-api's crop (extractFaceTensors: box clipped at the
// borders and floored) and its NetInput (centred zero padding to a square, resizeBilinear to 112).
const fs = require('fs');
const faceapi = require('@vladmandic/face-api/dist/face-api.node-wasm.js');

const { tf } = faceapi;
// x0, y0, x1, y1 in face.png's pixels: FaceBoxes' box on face.png, one running past the top-left
// corner (clipping, an odd padding), and one wider than tall (padding above and below).
const CASES = {
  faceboxes: [22.26, 16.73, 126.85, 163.53],
  clipped: [-10.3, -6.7, 100.2, 120.9],
  wide: [5.5, 40.2, 149.0, 150.7],
};
// Pixels of the 112x112 input recorded per case (row, col), to check the crop on its own.
const PIXELS = [[0, 0], [0, 111], [111, 0], [111, 111], [56, 56], [7, 93], [30, 5], [30, 106],
  [55, 0], [55, 111], [90, 41], [101, 64], [13, 77], [64, 13], [77, 100], [100, 77]];

async function main() {
  const [rgbPath, width, height, modelDir] = process.argv.slice(2);
  await tf.setBackend('cpu');
  await tf.ready();
  await faceapi.nets.faceExpressionNet.loadFromDisk(modelDir);
  await faceapi.nets.ageGenderNet.loadFromDisk(modelDir);
  const pixels = new Uint8Array(fs.readFileSync(rgbPath));
  const image = tf.tensor3d(pixels, [Number(height), Number(width), 3], 'int32');
  const out = {
    image: 'face.png',
    source: `@vladmandic/face-api ${faceapi.version}, tfjs ${tf.version_core} cpu backend`,
    expressions: ['neutral', 'happy', 'sad', 'angry', 'fearful', 'disgusted', 'surprised'],
    cases: {},
  };
  for (const [name, [x0, y0, x1, y1]] of Object.entries(CASES)) {
    const [face] = await faceapi.extractFaceTensors(image, [new faceapi.Rect(x0, y0, x1 - x0, y1 - y0)]);
    const netInput = await faceapi.toNetInput(face);
    const batch = netInput.toBatchTensor(112, true);
    const input = await batch.array();
    const feature = await faceapi.nets.faceExpressionNet.faceFeatureExtractor.forwardInput(netInput).data();
    const expressions = await faceapi.nets.faceExpressionNet.predictExpressions(face);
    const ageGender = await faceapi.nets.ageGenderNet.forwardInput(netInput);
    out.cases[name] = {
      box: [x0, y0, x1, y1],
      crop_shape: face.shape,
      input_pixels: PIXELS.map(([r, c]) => ({ row: r, col: c, rgb: input[0][r][c] })),
      input_mean_rgb: [0, 1, 2].map((k) => input[0].flat().reduce((s, p) => s + p[k], 0) / (112 * 112)),
      expression_feature: Array.from(feature),
      expression_probs: out.expressions.map((e) => expressions[e]),
      age: (await ageGender.age.data())[0],
      gender_prob_male: (await ageGender.gender.data())[0],
    };
  }
  process.stdout.write(`${JSON.stringify(out, null, 1)}\n`);
}

main();
