//! `Engine::infer` runs a batch's leading layers image by image when their maps are big
//! (over 1 MiB an image); `forward_with` runs every layer on the whole batch. Both must give
//! the same logits: each output value is computed by the same code in the same order either
//! way, so they agree to the last bit in practice; the bound, 1e-6 of the largest logit,
//! leaves room only for a different summation order, not for a misplaced image.

use repvgg_arch::{ArchSpec, Form};
use repvgg_checkpoint::Checkpoint;
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_checkpoint::random;
use repvgg_engine::{Engine, Workspace};

#[test]
fn leading_layers_image_by_image_match_the_whole_batch() {
    // A stem of 80 channels on a 128x128 input: 64x64x80 floats (1.3 MB) an image out of the
    // stem and into stage 1, so both run image by image; the rest does not.
    let spec = ArchSpec::parse("depths=1,1,1,1;widths=16,32,32,64;stem=80;classes=10").unwrap();
    let weights = random::training_weights(&spec, 3);
    let ckpt = Checkpoint::from_state_dict(spec, Form::Train, weights).unwrap();
    let engine = Engine::from_checkpoint(&ckpt, DEFAULT_BN_EPS).unwrap();
    let (n, h, w) = (3, 128, 128);
    let input: Vec<f32> = (0..n * 3 * h * w)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        let mut ws = Workspace::default();
        let whole = engine
            .forward_with(&input, n, h, w, &mut ws, |_, _, _, _| {})
            .unwrap();
        let by_image = engine
            .forward(&input, n, h, w, &mut Workspace::default())
            .unwrap();
        let scale = whole.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = whole
            .iter()
            .zip(&by_image)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(scale > 0.0 && err <= 1e-6 * scale, "{err:e} of {scale}");
        // The images differ, so a misplaced image would show.
        assert_ne!(whole[..10], whole[10..20]);
    });
}
