//! Caption text: the CLIP tokenizer, caption assembly and augmentation, cleaning rules.

pub mod caption_text;
pub mod clean;
pub mod tokenize;
