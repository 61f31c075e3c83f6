//! The splits of a dataset and the pieces of text each is read as: the vocabulary every
//! stage of data/ shares, so that none of them imports another for it.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Valid, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Valid => "valid",
            Split::Test => "test",
        }
    }
}

/// A run of text; a new document starts with it when `starts_document` is set (the
/// token stream puts `<|endoftext|>` there). Long documents arrive in several pieces so
/// that memory stays bounded.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: String,
    pub starts_document: bool,
}
