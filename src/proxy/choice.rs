//! STUB (replaced by the health branch).
#[derive(Default)]
pub struct Rotation;

impl Rotation {
    pub fn pick(
        &self,
        _group: u64,
        members: &[(usize, u32)],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        members.iter().map(|(index, _)| *index).find(|index| eligible(*index))
    }
}
