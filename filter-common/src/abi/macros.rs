//! The macros that declare the ABI's enumerations and describe its layouts for
//! [`super::LAYOUT_FINGERPRINT`].

/// Declares a `u8` enumeration newtype of the ABI from one list of
/// `NAME = value => "label"` lines:
///
/// - `pub const NAME: Self` for each line (with the line's doc comment);
/// - `COUNT` (how many values are listed) and `ALL` (every value, in list order);
/// - `name()`: the label of a listed value, and the `unknown` label for any other byte
///   (a map can hold any byte; some types map unknown values to their fail-safe label);
/// - with `dense`: `index()`, and a compile-time check that the values are `0..COUNT` in
///   order, so `COUNT` can size an array map indexed by the value;
/// - a compile-time check that no two values are equal;
/// - `fingerprint()`, which folds the values into [`super::LAYOUT_FINGERPRINT`]: add a
///   new enumeration to `layout_fingerprint()` in abi.rs.
///
/// ```text
/// abi_enum! {
///     /// Doc of the type.
///     pub struct Direction(u8), dense, unknown "unknown" {
///         /// Doc of the constant.
///         EGRESS = 0 => "egress",
///         INBOUND = 1 => "inbound",
///     }
/// }
/// ```
///
/// Other methods (such as [`super::Mode::effective`]) go into a separate `impl` block.
macro_rules! abi_enum {
    (
        $(#[$meta:meta])*
        pub struct $name:ident(u8), $density:ident, unknown $unknown:literal {
            $(
                $(#[$vmeta:meta])*
                $konst:ident = $value:literal => $label:literal,
            )+
        }
    ) => {
        $(#[$meta])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u8);

        impl $name {
            $(
                $(#[$vmeta])*
                pub const $konst: Self = Self($value);
            )+
            /// Number of listed values.
            pub const COUNT: u8 = [$(Self::$konst),+].len() as u8;
            /// Every listed value, in declaration order.
            pub const ALL: [Self; Self::COUNT as usize] = [$(Self::$konst),+];

            /// Label for metrics and tools.
            pub const fn name(self) -> &'static str {
                match self.0 {
                    $($value => $label,)+
                    _ => $unknown,
                }
            }

            /// Folds the listed values into a layout fingerprint.
            const fn fingerprint(fp: Fingerprint) -> Fingerprint {
                let mut fp = fp.part(Self::COUNT as u32);
                let mut rest: &[Self] = &Self::ALL;
                while let [first, tail @ ..] = rest {
                    fp = fp.part(first.0 as u32);
                    rest = tail;
                }
                fp
            }
        }

        const _: () = {
            let mut rest: &[$name] = &$name::ALL;
            while let [first, tail @ ..] = rest {
                let mut others = tail;
                while let [other, more @ ..] = others {
                    assert!(
                        first.0 != other.0,
                        concat!("two constants of ", stringify!($name), " share a value")
                    );
                    others = more;
                }
                rest = tail;
            }
        };
        abi_enum!(@$density $name);
    };
    (@dense $name:ident) => {
        impl $name {
            /// Index into the array map this enumeration sizes.
            #[inline(always)]
            pub const fn index(self) -> u32 {
                self.0 as u32
            }
        }

        const _: () = {
            let mut rest: &[$name] = &$name::ALL;
            let mut expected = 0u8;
            while let [first, tail @ ..] = rest {
                assert!(
                    first.0 == expected,
                    concat!(stringify!($name), " is dense: its values must be 0, 1, 2, ... in order")
                );
                expected += 1;
                rest = tail;
            }
        };
    };
    (@sparse $name:ident) => {};
}

/// The size and the field offsets of a map type, as fingerprint parts. Every field must
/// be listed: the pattern below stops compiling when one is missing.
macro_rules! layout_of {
    ($ty:ident { $($field:tt),+ $(,)? }) => {{
        #[expect(dead_code, reason = "only compiled, to prove the field list complete")]
        fn every_field_listed(value: &$ty) {
            let $ty { $($field: _),+ } = value;
        }
        [size_of::<$ty>() as u32, $(offset_of!($ty, $field) as u32),+]
    }};
}
