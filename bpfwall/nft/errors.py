"""The one error class of the nft backend."""
from ..errors import Error


class NftError(Error):
    """A request the nft backend refuses or nftables rejected; str() is one line."""
