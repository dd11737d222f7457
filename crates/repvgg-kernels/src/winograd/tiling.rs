//! How a layer's output map is cut into tiles, and how tiles are numbered across a batch.

use super::Algorithm;

/// How one side of the output map is cut into tiles: `main` tiles of the layer's transform,
/// then, for F(4x4) on a side that leaves 1 or 2 outputs, one F(2x2) tile (the `rim`) instead
/// of a padded F(4x4) one: a 14-pixel side costs 3 x 6 + 4 transform points, not 4 x 6.
#[derive(Clone, Copy)]
pub(super) struct Cut {
    pub(super) main: usize,
    pub(super) rim: bool,
}

impl Cut {
    fn new(algorithm: Algorithm, side: usize) -> Cut {
        match algorithm {
            Algorithm::F4 if matches!(side % 4, 1 | 2) => Cut {
                main: side / 4,
                rim: true,
            },
            _ => Cut {
                main: side.div_ceil(algorithm.m()),
                rim: false,
            },
        }
    }

    fn tiles(self) -> usize {
        self.main + self.rim as usize
    }
}

/// Output tiles of a call with `n` images and an `oh x ow` output map: what [`super::Task`]s count.
pub fn tile_count(algorithm: Algorithm, n: usize, oh: usize, ow: usize) -> usize {
    n * Cut::new(algorithm, oh).tiles() * Cut::new(algorithm, ow).tiles()
}

/// A layer's tiles, numbered class by class (main rows and columns; the rim row; the rim
/// column; the corner), each image by image, so that the tiles that use a transform point
/// make at most two runs of rows for its product.
pub(super) struct Tiling {
    /// `(first tile, tiles, rim row, rim column)`
    pub(super) classes: [(usize, usize, bool, bool); 4],
    /// Tiles of each class per image, along y and x.
    sides: [(usize, usize); 4],
    pub(super) y: Cut,
    pub(super) x: Cut,
}

impl Tiling {
    pub(super) fn new(algorithm: Algorithm, n: usize, oh: usize, ow: usize) -> Tiling {
        let (y, x) = (Cut::new(algorithm, oh), Cut::new(algorithm, ow));
        let (ry, rx) = (y.rim as usize, x.rim as usize);
        let sides = [(y.main, x.main), (ry, x.main), (y.main, rx), (ry, rx)];
        let mut first = 0;
        let classes = std::array::from_fn(|i| {
            let count = n * sides[i].0 * sides[i].1;
            first += count;
            (first - count, count, i % 2 == 1, i >= 2)
        });
        Tiling {
            classes,
            sides,
            y,
            x,
        }
    }

    /// `(class, image, first output row, first output column)` of tile `t`.
    pub(super) fn locate(&self, t: usize, m: usize) -> (usize, usize, usize, usize) {
        let class = self.classes.iter().rposition(|c| c.0 <= t && c.1 > 0);
        let class = class.expect("tile numbers start at 0");
        let (first, _, rim_y, rim_x) = self.classes[class];
        let (tiles_y, tiles_x) = self.sides[class];
        let i = t - first;
        let image = i / (tiles_y * tiles_x);
        let (ty, tx) = ((i / tiles_x) % tiles_y, i % tiles_x);
        let y0 = if rim_y { m * self.y.main } else { m * ty };
        let x0 = if rim_x { m * self.x.main } else { m * tx };
        (class, image, y0, x0)
    }
}
